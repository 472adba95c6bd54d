/* ksym: every other symbol of the core kernel, as stable.bpf.c prints every
 * tenth: some 2.5 MB, more than two of cat's 1 MiB reads, the same at every open. */
#include "common.h"

SEC("iter/ksym")
int dump_stable(struct bpf_iter__ksym *ctx)
{
	struct kallsym_iter *it = ctx->ksym;

	if (!it || it->module_name[0] || ctx->meta->seq_num % 2)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%llx %c %s\n", it->value, it->type, it->name);
	return 0;
}
