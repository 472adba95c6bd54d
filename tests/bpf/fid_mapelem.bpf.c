/* bpf_map_elem (map = an array map the test makes: 4-byte keys, 8-byte
 * values): "elem KEY value VALUE\n" per element, "# end" after the last. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/bpf_map_elem")
int fid_mapelem(struct bpf_iter__bpf_map_elem *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u32 *key = ctx->key;
	__u64 *value = ctx->value;

	if (!key || !value) {
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	BPF_SEQ_PRINTF(seq, "elem %07u value %016llx\n", *key, *value);
	return 0;
}
