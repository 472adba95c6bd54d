/* kmem_cache/slabinfo: every slab cache (the caches of /proc/slabinfo).
 *
 * Format: one header line, then one line per cache in slab_caches order:
 *   name                     objsize    size align flags
 *   "%-24s %7u %7u %5u 0x%08x\n"
 * objsize = object_size (what the user asked for), size = the per-object
 * footprint with metadata and alignment (/proc/slabinfo's <objsize> column),
 * align = align, flags = slab_flags_t of the cache.
 */
#include "common.h"

SEC("iter/kmem_cache")
int dump_slabinfo(struct bpf_iter__kmem_cache *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct kmem_cache *s = ctx->s;

	if (!s)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "%-24s %7s %7s %5s %s\n", "name", "objsize", "size", "align", "flags");
	BPF_SEQ_PRINTF(seq, "%-24s %7u %7u %5u 0x%08x\n", BPF_CORE_READ(s, name),
		       BPF_CORE_READ(s, object_size), BPF_CORE_READ(s, size),
		       BPF_CORE_READ(s, align), (__u32)BPF_CORE_READ(s, flags));
	return 0;
}
