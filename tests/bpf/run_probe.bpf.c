/* ksym: "ADDRESS NAME" a symbol. Uniquely named, so the programs and links it
 * leaves (or not) can be told from others' (tests/test_run.py). */
#include "common.h"

SEC("iter/ksym")
int dump_run_probe(struct bpf_iter__ksym *ctx)
{
	struct kallsym_iter *it = ctx->ksym;

	if (!it)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%016llx %s\n", it->value, it->name);
	return 0;
}
