// SPDX-License-Identifier: GPL-2.0-only
/*
 * bpf_link.bpf.c -- iter/bpf_link: every BPF link, in id order, as text:
 *     LINK_ID TYPE PROG_ID PROG_NAME
 * The original writes each link's id as 4 binary bytes with bpf_seq_write();
 * this prints them, and what the link runs, one line each.
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_bpf_link.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/bpf_link")
int corpus_bpf_link(struct bpf_iter__bpf_link *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct bpf_link *link = ctx->link;
	struct bpf_prog_aux *aux;

	if (!link)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, " link_id type  prog_id prog_name\n");
	/* a link being torn down may have lost its program: read, don't walk */
	aux = BPF_CORE_READ(link, prog, aux);
	if (!aux) {
		BPF_SEQ_PRINTF(seq, "%8u %4u %8u -\n", link->id, link->type, 0);
		return 0;
	}
	BPF_SEQ_PRINTF(seq, "%8u %4u %8u %s\n", link->id, link->type,
		       BPF_CORE_READ(aux, id), aux->name);
	return 0;
}
