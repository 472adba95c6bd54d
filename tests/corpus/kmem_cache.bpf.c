// SPDX-License-Identifier: GPL-2.0-only
/*
 * kmem_cache.bpf.c -- iter/kmem_cache: the slab caches, one per line:
 *     NAME OBJSIZE SIZE ALIGN OBJPERSLAB PAGESPERSLAB NODES HOME
 * HOME is the slab cache that holds the struct kmem_cache itself, found with
 * bpf_get_kmem_cache(), the kfunc the original tests ("kmem_cache" for all but
 * caches set up before slab was). NODES counts the NUMA nodes the cache keeps
 * per-node state for, walked with an open-coded numbers iterator over the
 * first nr_node_ids slots of its node[] array (struct kmem_cache is allocated
 * only that long: nr_node_ids is what HOME's object size leaves for node[]).
 * The kfuncs are declared in corpus_kfuncs.h of tests/corpus/include, as the
 * original declares its own in the selftests' bpf_experimental.h: this source
 * compiles only with -I tests/corpus/include.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/kmem_cache_iter.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "corpus_kfuncs.h"

char LICENSE[] SEC("license") = "GPL";

#define CORPUS_OO_SHIFT		16
#define CORPUS_MAX_NODES	(sizeof(((struct kmem_cache *)0)->node) / sizeof(void *))

SEC("iter/kmem_cache")
int corpus_kmem_cache(struct bpf_iter__kmem_cache *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct kmem_cache *s = ctx->s, *home;
	unsigned int oo, home_size, nr_nodes = 1;
	struct list_head *prev;
	__u64 self = 0;
	int i, nodes = 0;

	if (!s)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "# name objsize size align objperslab pagesperslab nodes home\n");

	/* S's address as a plain number (a kfunc taking an address refuses a
	 * pointer): read it back from its neighbour on the slab_caches list */
	prev = s->list.prev;
	bpf_probe_read_kernel(&self, sizeof(self), &prev->next);
	home = bpf_get_kmem_cache(self);
	if (home) {
		home_size = BPF_CORE_READ(home, object_size);
		if (home_size > bpf_core_field_offset(struct kmem_cache, node))
			nr_nodes = (home_size - bpf_core_field_offset(struct kmem_cache, node)) /
				   sizeof(void *);
	}
	if (nr_nodes > CORPUS_MAX_NODES)
		nr_nodes = CORPUS_MAX_NODES;
	corpus_for(i, 0, nr_nodes) {
		if (i >= CORPUS_MAX_NODES)	/* for the verifier: i indexes node[] */
			break;
		if (BPF_CORE_READ(s, node[i]))
			nodes++;
	}

	oo = s->oo.x;
	BPF_SEQ_PRINTF(seq, "%s %u %u %u %u %u %d %s\n", s->name, s->object_size, s->size,
		       s->align, oo & ((1U << CORPUS_OO_SHIFT) - 1), 1U << (oo >> CORPUS_OO_SHIFT),
		       nodes, home ? BPF_CORE_READ(home, name) : "-");
	return 0;
}
