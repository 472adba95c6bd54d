/* bpf_map_elem (--map: a map of __u32 keys and values): "KEY=VALUE" a line. */
#include "common.h"

SEC("iter/bpf_map_elem")
int dump_elems(struct bpf_iter__bpf_map_elem *ctx)
{
	__u32 *key = ctx->key, *value = ctx->value;

	if (!key || !value)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%u=%u\n", *key, *value);
	return 0;
}
