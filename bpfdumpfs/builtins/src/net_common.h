/* Shared by the network dumpers (tcp, tcp6, udp, udp6, unix, netlink).
 * Include after "common.h".
 *
 * Every helper here is static __always_inline, so a program gets only what
 * it calls. Some parts need a setting from the program, #defined before the
 * #include:
 * - LINE_WIDTH: the width seq_pad() pads /proc's lines to; enables
 *   put_chunk(), EMIT() and pad_line() for the padded formats.
 * - NET_TCP: the tcp helpers (jiffies conversion, timers, sl numbering),
 *   which read CONFIG_HZ.
 * - FAMILY (AF_INET or AF_INET6): enables PUT_ADDRS() for that family.
 * Each program defines header[], its /proc header line, before the #include
 * (with its newline, unless LINE_WIDTH pads it).
 */
#ifndef BPFDUMPFS_NET_COMMON_H
#define BPFDUMPFS_NET_COMMON_H

#include <bpf/bpf_endian.h>

#define AF_INET		2
#define AF_INET6	10
#define SESSIONS	1024	/* sessions tracked at once (LRU) */

/* A per-session LRU hash keyed by meta->session_id. */
#define SESSION_MAP(name, value_type)				\
	struct {						\
		__uint(type, BPF_MAP_TYPE_LRU_HASH);		\
		__uint(max_entries, SESSIONS);			\
		__type(key, __u64);				\
		__type(value, value_type);			\
	} name SEC(".maps")


#ifdef LINE_WIDTH
static __always_inline void pad_line(struct seq_file *seq, __u64 used);
#endif

/* The program's header[], as /proc prints it. */
static __always_inline void put_header(struct seq_file *seq)
{
	bpf_seq_write(seq, header, sizeof(header) - 1);
#ifdef LINE_WIDTH
	pad_line(seq, sizeof(header) - 1);
#endif
}

/* Header: printed by the object with seq_num == 0, before any filtering, or
 * else by the epilogue (NULL object) when no object ran. On this kernel the
 * epilogue gets the seq_num of the last object shown (0 after exactly one
 * object) and (u64)-1 when there was none, because the socket targets
 * subtract their start token from seq_num. seq_num 0 in the epilogue is
 * therefore ambiguous; the per-session map entry (value *fresh) created by
 * object 0 settles it (entry present: the header is already out). If LRU
 * evicted the entry, seq_num != 0 still shows that objects ran, so only a
 * lone evicted object can repeat the header.
 *
 * Returns true in the epilogue (obj == NULL): the caller stops there. */
static __always_inline bool session_header(struct seq_file *seq, void *map,
					   __u64 session, __u64 seq_num,
					   const void *obj, const void *fresh)
{
	if (seq_num == 0 && obj) {
		bpf_map_update_elem(map, &session, fresh, BPF_ANY);
		put_header(seq);
	}
	if (obj)
		return false;
	if (seq_num == (__u64)-1 ||
	    (seq_num == 0 && !bpf_map_lookup_elem(map, &session)))
		put_header(seq);
	bpf_map_delete_elem(map, &session);
	return true;
}

static __always_inline __u64 sock_ino(struct sock *sk)
{
	struct socket *sock;

	if (bpf_core_field_exists(sk->sk_ino))
		return sk->sk_ino;
	sock = sk->sk_socket;
	if (!sock)
		return 0;
	return BPF_CORE_READ(container_of(sock, struct socket_alloc, socket), vfs_inode.i_ino);
}

/* sk_drops_read(): newer kernels may count drops in per-NUMA counters. */
struct numa_drop_counters___new {
	atomic_t drops0;
	atomic_t drops1;
} __attribute__((preserve_access_index));

struct sock___new {
	struct numa_drop_counters___new *sk_drop_counters;
} __attribute__((preserve_access_index));

static __always_inline int sk_drops_read(struct sock *sk)
{
	int drops = sk->sk_drops.counter;

	if (bpf_core_field_exists(struct sock___new, sk_drop_counters)) {
		struct numa_drop_counters___new *ndc =
			BPF_CORE_READ((struct sock___new *)sk, sk_drop_counters);

		if (ndc)
			drops += BPF_CORE_READ(ndc, drops0.counter) +
				 BPF_CORE_READ(ndc, drops1.counter);
	}
	return drops;
}

/* Before 6.2 every namespace shared this one UDP table (net->ipv4.udp_table came
 * with per-namespace tables); typeless, so any kernel's symbol will do. */
extern const void udp_table __ksym __weak;

/* The slot of /proc's udp walk: udp_hashfn(net, inet_num, udptable->mask). */
static __always_inline int udp_proc_bucket(struct sock *sk)
{
	struct net *net = sk->__sk_common.skc_net.net;
	struct udp_table *table = (struct udp_table *)&udp_table;
	__u32 mix = 0;

	if (bpf_core_field_exists(net->hash_mix))
		mix = net->hash_mix;
	if (bpf_core_field_exists(net->ipv4.udp_table))
		table = BPF_CORE_READ(net, ipv4.udp_table);
	return (sk->__sk_common.skc_num + mix) & BPF_CORE_READ(table, mask);
}

#ifdef LINE_WIDTH
#define CHUNK		128

#define S10 "          "
static const char spaces[] = S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10 S10;
_Static_assert(sizeof(spaces) > LINE_WIDTH, "spaces must cover LINE_WIDTH");

/* Write a bpf_snprintf() result (n counts the NUL); return bytes written. */
static __always_inline __u64 put_chunk(struct seq_file *seq, char *buf, long n)
{
	if (n <= 1)
		return 0;
	n--;
	if (n > CHUNK - 1)
		n = CHUNK - 1;
	bpf_seq_write(seq, buf, n);
	return n;
}

#define EMIT(seq, buf, fmt, args...) \
	put_chunk(seq, buf, BPF_SNPRINTF(buf, sizeof(buf), fmt, args))

/* seq_pad(): spaces up to LINE_WIDTH, then the newline. */
static __always_inline void pad_line(struct seq_file *seq, __u64 used)
{
	__u64 n = LINE_WIDTH - used;

	/* Hide n from clang so the range check stays on the register the
	 * verifier sees passed to bpf_seq_write(). */
	asm volatile("" : "+r"(n));
	if (used < LINE_WIDTH && n < sizeof(spaces))
		bpf_seq_write(seq, spaces, n);
	bpf_seq_write(seq, "\n", 1);
}
#endif /* LINE_WIDTH */

/* One /proc line, written in pieces: LINE_VARS declares what the pieces need,
 * PUT() writes one, END_LINE() ends the line. With LINE_WIDTH the pieces are
 * counted and the line padded, as seq_pad() does; without, the line just ends. */
#ifdef LINE_WIDTH
#define LINE_VARS		char buf[CHUNK]; __u64 used = 0
#define PUT(seq, fmt, args...)	(used += EMIT(seq, buf, fmt, args))
#define END_LINE(seq)		pad_line(seq, used)
#else
#define LINE_VARS
#define PUT(seq, fmt, args...)	BPF_SEQ_PRINTF(seq, fmt, args)
#define END_LINE(seq)		bpf_seq_write(seq, "\n", 1)
#endif

/* "SRC:PORT DST:PORT" of a socket of the program's FAMILY, as /proc prints them
 * (SRCP in host order; the destination port is read from the socket). */
#if FAMILY == AF_INET6
#define PUT_ADDRS(seq, skc, srcp)						\
	PUT(seq, "%08X%08X%08X%08X:%04X %08X%08X%08X%08X:%04X",			\
	    (skc)->skc_v6_rcv_saddr.in6_u.u6_addr32[0],				\
	    (skc)->skc_v6_rcv_saddr.in6_u.u6_addr32[1],				\
	    (skc)->skc_v6_rcv_saddr.in6_u.u6_addr32[2],				\
	    (skc)->skc_v6_rcv_saddr.in6_u.u6_addr32[3], srcp,			\
	    (skc)->skc_v6_daddr.in6_u.u6_addr32[0],				\
	    (skc)->skc_v6_daddr.in6_u.u6_addr32[1],				\
	    (skc)->skc_v6_daddr.in6_u.u6_addr32[2],				\
	    (skc)->skc_v6_daddr.in6_u.u6_addr32[3], bpf_ntohs((skc)->skc_dport))
#elif defined(FAMILY)
#define PUT_ADDRS(seq, skc, srcp)						\
	PUT(seq, "%08X:%04X %08X:%04X", (skc)->skc_rcv_saddr, srcp,		\
	    (skc)->skc_daddr, bpf_ntohs((skc)->skc_dport))
#endif

#ifdef NET_TCP
#define USER_HZ		100
#define NSEC_PER_SEC	1000000000ULL

/* icsk_pending values (include/net/inet_connection_sock.h) */
#define ICSK_TIME_RETRANS	1
#define ICSK_TIME_PROBE0	3
#define ICSK_TIME_LOSS_PROBE	5
#define ICSK_TIME_REO_TIMEOUT	6
#define TCP_INFINITE_SSTHRESH	0x7fffffff

extern unsigned long CONFIG_HZ __kconfig;

/* "sl": /proc numbers the lines it prints 0, 1, 2, ... The tcp iterator
 * visits IPv4 and IPv6 sockets alike, so tcp and tcp6 keep a per-session
 * counter of printed lines (map entry created by object 0). */
struct sl_state {
	__u64 last_seq;		/* seq_num of the last object given a number */
	__u32 cur;		/* number given to that object */
	__u32 next;		/* number for the next printed object */
};

/* The number of the line for object seq_num, idempotent per object: a re-run
 * after a buffer overflow (same seq_num) reuses it. */
static __always_inline __u32 line_number(void *map, __u64 session, __u64 seq_num)
{
	struct sl_state *st = bpf_map_lookup_elem(map, &session);

	if (!st)	/* evicted: best effort */
		return seq_num;
	if (st->last_seq != seq_num) {
		st->cur = st->next++;
		st->last_seq = seq_num;
	}
	return st->cur;
}

/* Old kernels kept the retransmit deadline in its own field. */
struct inet_connection_sock___old {
	unsigned long icsk_timeout;
} __attribute__((preserve_access_index));

static __always_inline __u64 jiffies_to_clock_t(__u64 x)
{
	__u64 hz = CONFIG_HZ;
	__u64 tick_nsec = (NSEC_PER_SEC + hz / 2) / hz;

	if (tick_nsec % (NSEC_PER_SEC / USER_HZ) == 0) {
		if (hz < USER_HZ)
			return x * (USER_HZ / hz);
		return x / (hz / USER_HZ);
	}
	return x * tick_nsec / (NSEC_PER_SEC / USER_HZ);
}

static __always_inline __u64 jiffies_delta_to_clock_t(long delta)
{
	return jiffies_to_clock_t(delta > 0 ? delta : 0);
}

/* inet_csk_in_pingpong_mode(). Kernels without the sysctl compared with a
 * constant TCP_PINGPONG_THRESH instead (1 in most releases, 3 in a few). */
static __always_inline int in_pingpong_mode(struct sock *sk, __u8 pingpong)
{
	struct net *net = sk->__sk_common.skc_net.net;

	if (bpf_core_field_exists(net->ipv4.sysctl_tcp_pingpong_thresh))
		return pingpong >= net->ipv4.sysctl_tcp_pingpong_thresh;
	return pingpong >= 1;
}

static __always_inline unsigned long retrans_expires(struct inet_connection_sock *icsk)
{
	struct inet_connection_sock___old *old = (void *)icsk;

	if (bpf_core_field_exists(old->icsk_timeout))
		return BPF_CORE_READ(old, icsk_timeout);
	return icsk->icsk_retransmit_timer.expires;
}

/* A full socket's "tr" timer kind and its deadline (*expires), as
 * get_tcp4_sock()/get_tcp6_sock() pick them. */
static __always_inline int tcp_timer(struct inet_connection_sock *icsk,
				     struct sock *sk, __u64 now,
				     unsigned long *expires)
{
	__u8 pending = icsk->icsk_pending;

	if (pending == ICSK_TIME_RETRANS || pending == ICSK_TIME_REO_TIMEOUT ||
	    pending == ICSK_TIME_LOSS_PROBE) {
		*expires = retrans_expires(icsk);
		return 1;
	}
	if (pending == ICSK_TIME_PROBE0) {
		*expires = retrans_expires(icsk);
		return 4;
	}
	if (sk->sk_timer.entry.pprev) {	/* timer_pending(keepalive) */
		*expires = sk->sk_timer.expires;
		return 2;
	}
	*expires = now;
	return 0;
}

/* A full socket's rx_queue and ssthresh columns. */
static __always_inline void tcp_queues(struct tcp_sock *tp, int state,
				       int *rx_queue, int *ssthresh)
{
	struct inet_connection_sock *icsk = &tp->inet_conn;
	struct sock *sk = &icsk->icsk_inet.sk;

	if (state == TCP_LISTEN) {
		*rx_queue = sk->sk_ack_backlog;
		*ssthresh = icsk->icsk_accept_queue.fastopenq.max_qlen;
	} else {
		*rx_queue = (int)(tp->rcv_nxt - tp->copied_seq);
		if (*rx_queue < 0)
			*rx_queue = 0;
		*ssthresh = tp->snd_ssthresh >= TCP_INFINITE_SSTHRESH ? -1 : (int)tp->snd_ssthresh;
	}
}
#endif /* NET_TCP */

#endif
