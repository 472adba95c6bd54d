/* bpf_prog/progs: every loaded BPF program, one line each, bpftool-like:
 *   ID: TYPE  name NAME  tag HEX
 *   "%u: %s  name %s  tag %02x%02x%02x%02x%02x%02x%02x%02x\n"
 * TYPE is bpftool's name for the program type ("kprobe", "tracing", "xdp",
 * ...), or the decimal number for a type this object does not know. NAME is
 * prog->aux->name ("-" if unnamed), tag the 8-byte prog->tag as 16 hex digits
 * (what `bpftool prog` shows). No header; id order.
 */
#include "common.h"

/* enum bpf_prog_type, in order; names as bpftool/libbpf print them */
static const char prog_type_names[][24] = {
	"unspec", "socket_filter", "kprobe", "sched_cls", "sched_act",
	"tracepoint", "xdp", "perf_event", "cgroup_skb", "cgroup_sock",
	"lwt_in", "lwt_out", "lwt_xmit", "sock_ops", "sk_skb",
	"cgroup_device", "sk_msg", "raw_tracepoint", "cgroup_sock_addr", "lwt_seg6local",
	"lirc_mode2", "sk_reuseport", "flow_dissector", "cgroup_sysctl",
	"raw_tracepoint_writable", "cgroup_sockopt", "tracing", "struct_ops", "ext",
	"lsm", "sk_lookup", "syscall", "netfilter",
};
#define N_PROG_TYPES (sizeof(prog_type_names) / sizeof(prog_type_names[0]))

SEC("iter/bpf_prog")
int dump_progs(struct bpf_iter__bpf_prog *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct bpf_prog *prog = ctx->prog;
	struct bpf_prog_aux *aux;
	const char *name;
	__u8 t[8];
	__u32 type;

	if (!prog)
		return 0;
	aux = prog->aux;
	type = prog->type;
	name = aux->name[0] ? aux->name : "-";
	bpf_probe_read_kernel(t, sizeof(t), prog->tag);
	if (type < N_PROG_TYPES)
		BPF_SEQ_PRINTF(seq, "%u: %s  name %s  tag %02x%02x%02x%02x%02x%02x%02x%02x\n",
			       aux->id, prog_type_names[type], name,
			       t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
	else
		BPF_SEQ_PRINTF(seq, "%u: %u  name %s  tag %02x%02x%02x%02x%02x%02x%02x%02x\n",
			       aux->id, type, name,
			       t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
	return 0;
}
