// SPDX-License-Identifier: GPL-2.0
/* tcp/tcp6: IPv6 TCP sockets in the format of /proc/net/tcp6.
 *
 * Output: the /proc header, then one line per AF_INET6 socket of the reader's
 * network namespace (IPv4-mapped dual-stack sockets included, as in /proc),
 * in the iterator's order (listening hash, then the established hash with
 * its time-wait and request sockets). /proc/net/tcp6 does not pad its lines
 * and neither does this program. Full sockets, time-wait sockets and request
 * (SYN_RECV) sockets use /proc's three line shapes.
 *
 * Differences from /proc/net/tcp6, and why:
 * - "sl": /proc numbers the lines it prints 0, 1, 2, ... The tcp iterator
 *   visits IPv4 and IPv6 sockets alike (ctx->meta->seq_num counts both), so
 *   this program keeps a per-session counter of printed lines in an LRU hash
 *   keyed by meta->session_id. The counter is idempotent per object: when the
 *   kernel re-runs an object after a buffer overflow (same seq_num) it reuses
 *   the number it gave that object. If the session's entry has been evicted
 *   (more than SESSIONS sessions open at once), sl falls back to seq_num.
 * - Reference count column: the iterator holds one reference on every socket
 *   of its batch while the program runs; this program subtracts that one so
 *   the column shows what /proc would show.
 * - Pointer column (%p, not /proc's %pK): the kernel's hashed pointer, the
 *   value /proc shows when kptr_restrict=0 (same hash key), but always a hash,
 *   never the raw address. %pK is decided at read() time by the credentials of
 *   the reading task; behind bpfdumpfs that is the root daemon, so %pK would
 *   hand raw kernel addresses to every reader when kptr_restrict=1. With
 *   kptr_restrict=1 or 2, /proc shows raw addresses (to CAP_SYSLOG) or zeros
 *   instead.
 * - tm->when and the other timer columns depend on jiffies at the moment of
 *   reading, as in /proc.
 *
 * Header: printed by the object with seq_num == 0, before any filtering (so
 * an IPv4 socket first in the iteration cannot swallow it), or else by the
 * epilogue (NULL socket) when no object ran. On this kernel the epilogue gets
 * the seq_num of the last object shown (0 after exactly one object) and
 * (u64)-1 when there was none, because the tcp target subtracts its start
 * token from seq_num. seq_num 0 in the epilogue is therefore ambiguous; the
 * per-session map entry created by object 0 settles it (entry present: the
 * header is already out).
 */
#include "common.h"

#define FAMILY		AF_INET6
#define DUMP_FN		dump_tcp6

static const char header[] =
	"  sl  local_address                         remote_address                        "
	"st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

#include "tcp.h"
