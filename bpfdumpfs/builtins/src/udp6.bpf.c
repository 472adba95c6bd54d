// SPDX-License-Identifier: GPL-2.0
/* udp/udp6: IPv6 UDP sockets in the format of /proc/net/udp6.
 *
 * Output: the /proc header, then one line per AF_INET6 UDP socket (not
 * UDP-Lite; IPv4-mapped dual-stack sockets included, as in /proc) of the
 * reader's network namespace, in the iterator's order (see below).
 * /proc/net/udp6 does not pad its lines and neither does this program.
 *
 * "sl" is the socket's bucket in the primary (port) hash table, as
 * /proc/net/udp6 prints it: sockets sharing a bucket share the number, so it
 * is not a line counter, and it is idempotent per object by construction.
 * The iterator walks the secondary (address+port) hash instead, and its
 * ctx->bucket is a slot of that table, so this program recomputes /proc's
 * bucket as udp_hashfn(): (local port + net->hash_mix) & udp_table->mask.
 *
 * Differences from /proc/net/udp6, and why:
 * - Line order: the iterator's (secondary hash) order, not /proc's (primary
 *   hash) order. Same lines, different order.
 * - "ref": the iterator holds one reference on every socket of its batch
 *   while the program runs; this program subtracts that one so the column
 *   shows what /proc would show.
 * - "pointer" (%p, not /proc's %pK): the kernel's hashed pointer, the value
 *   /proc shows when kptr_restrict=0 (same hash key), but always a hash, never
 *   the raw address. %pK is decided at read() time by the credentials of the
 *   reading task; behind bpfdumpfs that is the root daemon, so %pK would hand
 *   raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 *
 * Header: printed by the object with seq_num == 0, before any filtering (so
 * an IPv4 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the udp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; a
 * per-session entry (LRU hash keyed by meta->session_id) created by object 0
 * settles it.
 */
#include "common.h"

#define FAMILY		AF_INET6
#define DUMP_FN		dump_udp6

static const char header[] =
	"  sl  local_address                         remote_address                        "
	"st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";

#include "udp.h"
