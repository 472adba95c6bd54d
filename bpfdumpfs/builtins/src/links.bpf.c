/* bpf_link/links: every BPF link, one line each, bpftool-like:
 *   ID: TYPE  prog PROG_ID
 *   "%u: %s  prog %u\n"
 * TYPE is bpftool's name for the link type ("iter", "tracing", "tcx", ...),
 * or the decimal number for a type this object does not know. PROG_ID is 0
 * for a link without a program. No header; id order.
 */
#include "common.h"

/* enum bpf_link_type, in order; names as bpftool/libbpf print them */
static const char link_type_names[][20] = {
	"unspec", "raw_tracepoint", "tracing", "cgroup", "iter",
	"netns", "xdp", "perf_event", "kprobe_multi", "struct_ops",
	"netfilter", "tcx", "uprobe_multi", "netkit", "sockmap",
};
#define N_LINK_TYPES (sizeof(link_type_names) / sizeof(link_type_names[0]))

SEC("iter/bpf_link")
int dump_links(struct bpf_iter__bpf_link *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct bpf_link *link = ctx->link;
	struct bpf_prog *prog;
	__u32 type, prog_id = 0;

	if (!link)
		return 0;
	type = link->type;
	prog = link->prog;
	if (prog)
		prog_id = BPF_CORE_READ(prog, aux, id);
	if (type < N_LINK_TYPES)
		BPF_SEQ_PRINTF(seq, "%u: %s  prog %u\n", link->id, link_type_names[type], prog_id);
	else
		BPF_SEQ_PRINTF(seq, "%u: %u  prog %u\n", link->id, type, prog_id);
	return 0;
}
