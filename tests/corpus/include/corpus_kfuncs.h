/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * corpus_kfuncs.h -- kfunc declarations for tests/corpus, in the manner of the
 * kernel selftests' bpf_experimental.h (tools/testing/selftests/bpf/, GPL-2.0),
 * which kmem_cache_iter.c and many other selftests include for kfuncs that
 * libbpf's headers do not declare. Written here for bpfdumpfs's tests; no code
 * copied.
 *
 * libbpf 1.1's <bpf/bpf_helpers.h> (Debian 12) declares no kfuncs and has no
 * bpf_for()/bpf_repeat() (those came with libbpf 1.2), so this header brings
 * its own open-coded loop, corpus_for(), and names it apart from libbpf's to
 * stay out of the way of a newer libbpf. A source including this header
 * compiles only with `-I tests/corpus/include` (or `include = [...]` in a
 * config file): that is what the corpus test checks.
 */
#ifndef CORPUS_KFUNCS_H
#define CORPUS_KFUNCS_H

/* The numbers iterator (kernel/bpf/bpf_iter.c, 6.4+): an open-coded loop the
 * verifier checks once, whatever the bound, instead of unrolling it. */
extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __ksym;

/* The slab cache an object's address belongs to (mm/slab_common.c, 6.13+);
 * NULL if ADDR is not in a slab. An untrusted pointer: read it, don't pass it. */
extern struct kmem_cache *bpf_get_kmem_cache(__u64 addr) __ksym;

static __always_inline void corpus_num_end(struct bpf_iter_num *it)
{
	bpf_iter_num_destroy(it);
}

/* for (VAR = START; VAR < END; VAR++) { ... }, as an open-coded iterator; the
 * iterator is destroyed however the loop is left (break, return). VAR must be
 * an int declared before. */
#define corpus_for(var, start, end)						\
	for (struct bpf_iter_num ___it						\
		__attribute__((aligned(8), cleanup(corpus_num_end))),		\
	     *___p __attribute__((unused)) =					\
		(bpf_iter_num_new(&___it, (start), (end)), (void *)0);		\
	     ({ int *___n = bpf_iter_num_next(&___it);				\
		___n ? ((var) = *___n, 1) : 0; });				\
	    )

#endif
