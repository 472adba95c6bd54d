/* task: the reader's uid, from a helper called in a BPF function, which libbpf
 * appends to the program at load. */
#include "common.h"

static __noinline int reader_uid(void)
{
	return bpf_get_current_uid_gid() & 0xffff;
}

SEC("iter/task")
int print_reader_uid(struct bpf_iter__task *ctx)
{
	if (ctx->task && ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(ctx->meta->seq, "uid %d\n", reader_uid());
	return 0;
}
