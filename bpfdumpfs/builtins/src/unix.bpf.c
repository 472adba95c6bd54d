// SPDX-License-Identifier: GPL-2.0
/* unix/unix: AF_UNIX sockets in the format of /proc/net/unix.
 *
 * Output: the /proc header, then one line per unix socket of the reader's
 * network namespace: "Num RefCount Protocol Flags Type St Inode [Path]".
 * The path is printed as /proc prints it: the bytes of sun_path, with an
 * abstract name's leading NUL and every other NUL byte shown as '@', and
 * with no escaping of other bytes. Sockets without an address have no path
 * column (not even the separating space).
 *
 * Differences from /proc/net/unix, and why:
 * - RefCount: the iterator holds one reference on every socket of its batch
 *   while the program runs; this program subtracts that one so the column
 *   shows what /proc would show.
 * - Num (%p, not /proc's %pK): the kernel's hashed pointer, the value /proc
 *   shows when kptr_restrict=0 (same hash key), but always a hash, never the
 *   raw address. %pK is decided at read() time by the credentials of the
 *   reading task; behind bpfdumpfs that is the root daemon, so %pK would hand
 *   raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 * - Nothing else: same lines in the same (hash table) order. The iterator
 *   takes a hash bucket's sockets as one batch, so a socket that comes or
 *   goes during the dump may be caught differently than by /proc.
 *
 * Header: printed by the object with seq_num == 0 (this program filters
 * nothing), or else by the epilogue (NULL socket) when no object ran. On this
 * kernel the epilogue gets the seq_num of the last object shown (0 after
 * exactly one object) and (u64)-1 when there was none, because the unix
 * target subtracts its start token from seq_num. seq_num 0 in the epilogue is
 * therefore ambiguous; a per-session entry (LRU hash keyed by
 * meta->session_id) created by object 0 settles it.
 */
#include "common.h"

static const char header[] = "Num       RefCount Protocol Flags    Type St Inode Path\n";

#include "net_common.h"

#define UNIX_PATH_MAX	108
#define PATH_ROOM	128	/* a power of two: a mask bounds the length for any verifier */
#define SUN_PATH_OFF	2	/* offsetof(struct sockaddr_un, sun_path) */
#define __SO_ACCEPTCON	(1 << 16)

SESSION_MAP(hdr_sessions, __u8);

/* " PATH" as unix_seq_show() prints it; nothing for unbound sockets. */
static __always_inline void put_path(struct seq_file *seq, struct unix_sock *u)
{
	struct unix_address *addr = u->addr;
	char path[PATH_ROOM];
	__u64 len, i;

	if (!addr)
		return;
	len = addr->len - SUN_PATH_OFF;
	/* Hide len from clang so the checks stay on the register used below. */
	asm volatile("" : "+r"(len));
	if (len == 0 || len > UNIX_PATH_MAX)
		return;
	if (bpf_probe_read_kernel(path, len, &addr->name[0].sun_path))
		return;
	if (path[0])
		len--;	/* a filesystem name: drop its terminating NUL */
	/* unrolled (one exit, so clang can): 6.1's verifier refused this loop's back-edge */
#pragma clang loop unroll(full)
	for (i = 0; i < UNIX_PATH_MAX; i++)
		if (i < len && !path[i])
			path[i] = '@';
	bpf_seq_write(seq, " ", 1);
	asm volatile("" : "+r"(len));
	if (len > 0 && len <= UNIX_PATH_MAX) {
		asm volatile("" : "+r"(len));	/* so clang keeps the mask it could prove idle */
		bpf_seq_write(seq, path, len & (PATH_ROOM - 1));
	}
}

SEC("iter/unix")
int dump_unix(struct bpf_iter__unix *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct seq_file *seq = meta->seq;
	struct unix_sock *u = ctx->unix_sk;
	__u64 seq_num = meta->seq_num;
	__u64 session = meta->session_id;
	__u8 one = 1;
	struct sock *sk;
	int state, st;

	if (session_header(seq, &hdr_sessions, session, seq_num, u, &one))
		return 0;	/* epilogue: see the comment at the top */

	sk = &u->sk;
	state = sk->__sk_common.skc_state;
	if (sk->sk_socket)
		st = state == TCP_ESTABLISHED ? SS_CONNECTED : SS_UNCONNECTED;
	else
		st = state == TCP_ESTABLISHED ? SS_CONNECTING : SS_DISCONNECTING;

	BPF_SEQ_PRINTF(seq, "%p: %08X %08X %08X %04X %02X %5lu",
		       sk, sk->__sk_common.skc_refcnt.refs.counter - 1, 0,
		       state == TCP_LISTEN ? __SO_ACCEPTCON : 0,
		       sk->sk_type, st, sock_ino(sk));
	put_path(seq, u);
	bpf_seq_write(seq, "\n", 1);
	return 0;
}
