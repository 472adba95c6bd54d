/* glibc's <bits/wordsize.h> for the BPF target, found before the host's.
 *
 * The host's (x86-64) keys the word size on __x86_64__, which clang's BPF
 * target does not define, so <errno.h> or <limits.h> would take the 32-bit
 * branch: LONG_MAX of 32 bits, and <gnu/stubs-32.h>, which a 64-bit host
 * lacks. BPF is LP64, as arm64's header already says by __LP64__. */
#ifndef __LP64__
#error "the BPF target is LP64"
#endif
#define __WORDSIZE 64
#define __WORDSIZE_TIME64_COMPAT32 1
#define __SYSCALL_WORDSIZE 64
