/* task: returns 1 ("run this object again") for every task, so the dump never
 * gets past its first task: every read(2) of the seq_file fails with EAGAIN. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/task")
int fid_retry_forever(struct bpf_iter__task *ctx)
{
	return ctx->task ? 1 : 0;
}
