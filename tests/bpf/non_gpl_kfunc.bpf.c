/* A non-GPL program calling kfuncs, which are GPL-only: the kernel stops before
 * the first instruction is verified. (Not common.h: that one is GPL.) */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Proprietary";

extern void bpf_rcu_read_lock(void) __ksym;
extern void bpf_rcu_read_unlock(void) __ksym;

SEC("iter/task")
int locks_rcu(struct bpf_iter__task *ctx)
{
	bpf_rcu_read_lock();
	bpf_rcu_read_unlock();
	return 0;
}
