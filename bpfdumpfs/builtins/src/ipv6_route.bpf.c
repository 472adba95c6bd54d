// SPDX-License-Identifier: GPL-2.0
/* ipv6_route/ipv6_route: the IPv6 FIB in the format of /proc/net/ipv6_route.
 *
 * Output: byte for byte what /proc/net/ipv6_route prints (it has no header):
 * one line per fib6_info of every table of the reader's network namespace,
 *   DST PLEN SRC PLEN GATEWAY METRIC REFCNT USE FLAGS DEV
 * with addresses as 32 hex digits, RTF_GATEWAY added to the flags when the
 * next hop has a gateway, the source prefix printed only when the kernel is
 * built with CONFIG_IPV6_SUBTREES (zeros otherwise, as /proc does; known by
 * whether fib6_info has fib6_src, not from Kconfig, which a host may lack), and for
 * routes using a nexthop object the first IPv6 next hop of that object
 * (nexthop_fib6_nh()). The iterator walks the same tables with the same
 * walker as /proc and takes no reference on the routes, so REFCNT is as
 * /proc shows it.
 *
 * There is no "sl" column and no header, so seq_num plays no part: each
 * object's line depends only on the object (idempotent), and the epilogue
 * (NULL route) prints nothing.
 */
#include "common.h"

#define AF_INET6	10
#define RTF_GATEWAY	0x0002

static const char zeros[] = "00000000000000000000000000000000";

/* nexthop_fib6_nh(): a group's first member, then that nexthop's fib6_nh.
 * Everything here is read by probe: nh_grp shares a union with nh_info and
 * the verifier types such a union by its first member only. */
static __always_inline struct fib6_nh *nexthop_fib6_nh(struct nexthop *nh)
{
	struct nh_info *nhi;

	if (BPF_CORE_READ(nh, is_group)) {
		struct nh_group *grp = BPF_CORE_READ(nh, nh_grp);

		if (!grp || BPF_CORE_READ(grp, num_nh) < 1)
			return NULL;
		nh = BPF_CORE_READ(grp, nh_entries[0].nh);
		if (!nh)
			return NULL;
	}
	nhi = BPF_CORE_READ(nh, nh_info);
	if (!nhi || BPF_CORE_READ(nhi, family) != AF_INET6)
		return NULL;
	return &nhi->fib6_nh;
}

SEC("iter/ipv6_route")
int dump_ipv6_route(struct bpf_iter__ipv6_route *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct fib6_info *rt = ctx->rt;
	struct fib6_nh *fib6_nh;
	struct net_device *dev = NULL;
	unsigned int flags;

	if (!rt)
		return 0;

	fib6_nh = &rt->fib6_nh[0];
	if (rt->nh)
		fib6_nh = nexthop_fib6_nh(rt->nh);
	flags = rt->fib6_flags;

	BPF_SEQ_PRINTF(seq, "%pi6 %02x ", &rt->fib6_dst.addr, rt->fib6_dst.plen);
	if (bpf_core_field_exists(rt->fib6_src))
		BPF_SEQ_PRINTF(seq, "%pi6 %02x ", &rt->fib6_src.addr, rt->fib6_src.plen);
	else
		BPF_SEQ_PRINTF(seq, "%s 00 ", zeros);

	/* fib6_nh may come from a probe read: read through it by probe too. */
	if (fib6_nh && BPF_CORE_READ(fib6_nh, nh_common.nhc_gw_family)) {
		flags |= RTF_GATEWAY;
		BPF_SEQ_PRINTF(seq, "%pi6", &fib6_nh->nh_common.nhc_gw.ipv6);
	} else {
		bpf_seq_write(seq, zeros, sizeof(zeros) - 1);
	}

	if (fib6_nh)
		dev = BPF_CORE_READ(fib6_nh, nh_common.nhc_dev);
	BPF_SEQ_PRINTF(seq, " %08x %08x %08x %08x %8s\n",
		       rt->fib6_metric, rt->fib6_ref.refs.counter, 0, flags,
		       dev ? dev->name : "");
	return 0;
}
