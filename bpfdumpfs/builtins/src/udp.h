/* The udp program, shared by udp.bpf.c (FAMILY AF_INET, padded lines) and
 * udp6.bpf.c (AF_INET6, unpadded): each #defines FAMILY, DUMP_FN (the program's
 * name) and, for padding, LINE_WIDTH, then includes this after common.h and its
 * header[]. See udp.bpf.c for the output and how it differs from /proc. */
#include "net_common.h"

SESSION_MAP(hdr_sessions, __u8);

SEC("iter/udp")
int DUMP_FN(struct bpf_iter__udp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct udp_sock *udp = ctx->udp_sk;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u8 one = 1;
	struct inet_sock *inet;
	struct sock *sk;
	LINE_VARS;

	if (session_header(seq, &hdr_sessions, session, seq_num, udp, &one))
		return 0;	/* epilogue: see the header comment of udp.bpf.c */

	inet = &udp->inet;
	sk = &inet->sk;
	if (sk->__sk_common.skc_family != FAMILY)
		return 0;

	PUT(seq, "%5d: ", udp_proc_bucket(sk));
	PUT_ADDRS(seq, &sk->__sk_common, bpf_ntohs(inet->inet_sport));
	PUT(seq, " %02X %08X:%08X %02X:%08lX %08X %5u %8d %lu %d %p %u",
	    sk->__sk_common.skc_state,
	    sk->sk_wmem_alloc.refs.counter - 1,
	    sk->sk_backlog.rmem_alloc.counter - udp->forward_deficit,
	    0, 0L, 0, ctx->uid, 0, sock_ino(sk),
	    sk->__sk_common.skc_refcnt.refs.counter - 1, sk, sk_drops_read(sk));
	END_LINE(seq);
	return 0;
}
