// SPDX-License-Identifier: GPL-2.0-only
/*
 * bpf_map.bpf.c -- iter/bpf_map: every BPF map, in id order, as
 *     ID TYPE MAX_ENTRIES REFCNT USERCNT NAME
 * between a header line and an END line. The original's locked_vm column is
 * gone from the kernel (maps are memcg-charged since 5.11); TYPE and
 * MAX_ENTRIES take its place.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_bpf_map.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/bpf_map")
int corpus_bpf_map(struct bpf_iter__bpf_map *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct bpf_map *map = ctx->map;

	if (!map) {
		BPF_SEQ_PRINTF(seq, "      %%%%%% END %%%%%%\n");
		return 0;
	}
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "      id type max_entries   refcnt  usercnt name\n");
	BPF_SEQ_PRINTF(seq, "%8u %4u %11u %8lld %8lld %s\n", map->id, map->map_type,
		       map->max_entries, map->refcnt.counter, map->usercnt.counter,
		       map->name);
	return 0;
}
