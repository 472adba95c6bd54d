/* glibc's <gnu/stubs.h> for the BPF target, found before the host's.
 *
 * The host's picks <gnu/stubs-32.h> unless __x86_64__ is defined, which clang's
 * BPF target does not define, and a 64-bit host lacks that file. The stubs only
 * name libc functions a host does not implement; a BPF program calls none. */
