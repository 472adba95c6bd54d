/* Shared by every built-in dumper: kernel types from the running kernel's BTF
 * (CO-RE keeps the objects portable) and libbpf's helper declarations. */
#ifndef BPFDUMPFS_COMMON_H
#define BPFDUMPFS_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#endif
