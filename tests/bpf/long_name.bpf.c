/* task: one fixed line. Its program's name has 19 characters, of which the kernel
 * keeps 15 ("slab_info_colle"); BTF has the whole name. The Makefile builds it
 * without -g too (build/long_name_nobtf.bpf.o): an object without BTF. */
#include "common.h"

SEC("iter/task")
int slab_info_collector(struct bpf_iter__task *ctx)
{
	if (ctx->task && ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(ctx->meta->seq, "fixed\n");
	return 0;
}
