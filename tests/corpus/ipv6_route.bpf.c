// SPDX-License-Identifier: GPL-2.0-only
/*
 * ipv6_route.bpf.c -- iter/ipv6_route: the IPv6 routes as /proc/net/ipv6_route
 * shows them:
 *     DEST PLEN SRC PLEN NEXTHOP METRIC REFCNT USE FLAGS DEVICE
 * addresses as 32 hex digits. The source prefix is only kept by kernels built
 * with CONFIG_IPV6_SUBTREES (a weak __kconfig extern: zeros elsewhere).
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_ipv6_route.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define CORPUS_RTF_GATEWAY	0x0002

extern bool CONFIG_IPV6_SUBTREES __kconfig __weak;

static const char zeros[] = "00000000000000000000000000000000";

SEC("iter/ipv6_route")
int corpus_ipv6_route(struct bpf_iter__ipv6_route *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct fib6_info *rt = ctx->rt;
	struct fib6_nh *nh;
	struct net_device *dev;
	__u32 flags;

	if (!rt)
		return 0;
	flags = rt->fib6_flags;
	nh = rt->nh ? &rt->nh->nh_info->fib6_nh : &rt->fib6_nh[0];

	BPF_SEQ_PRINTF(seq, "%pi6 %02x ", &rt->fib6_dst.addr, rt->fib6_dst.plen);
	if (CONFIG_IPV6_SUBTREES)
		BPF_SEQ_PRINTF(seq, "%pi6 %02x ", &rt->fib6_src.addr, rt->fib6_src.plen);
	else
		BPF_SEQ_PRINTF(seq, "%s 00 ", zeros);
	if (nh->nh_common.nhc_gw_family) {
		flags |= CORPUS_RTF_GATEWAY;
		BPF_SEQ_PRINTF(seq, "%pi6 ", &nh->nh_common.nhc_gw.ipv6);
	} else {
		BPF_SEQ_PRINTF(seq, "%s ", zeros);
	}
	dev = nh->nh_common.nhc_dev;
	BPF_SEQ_PRINTF(seq, "%08x %08x %08x %08x %8s\n", rt->fib6_metric,
		       rt->fib6_ref.refs.counter, 0, flags, dev ? dev->name : "");
	return 0;
}
