/* ksym: every tenth symbol of the core kernel (not modules, not BPF programs,
 * which come and go): about half a megabyte that stays the same from one open
 * to the next. stable_half.bpf.c is the same with every other symbol. */
#include "common.h"

SEC("iter/ksym")
int dump_stable(struct bpf_iter__ksym *ctx)
{
	struct kallsym_iter *it = ctx->ksym;

	if (!it || it->module_name[0] || ctx->meta->seq_num % 10)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%llx %c %s\n", it->value, it->type, it->name);
	return 0;
}
