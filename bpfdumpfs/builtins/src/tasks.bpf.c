/* task/tasks: a ps-like list of every task, threads included.
 *
 * Format: one header line, then one line per task, in iteration (tid) order:
 *     PID    TGID    PPID S        UID COMM
 *   "%7d %7d %7d %c %10u %s\n"
 * PID  = the thread's id, TGID = its process's, PPID = its parent process's,
 *        all in the pid namespace the seq_file was made in, as /proc there shows
 *        them (PPID 0 for pid 1 and kthreadd, and for a namespace's init),
 * S    = the one-letter state of /proc/PID/stat (R S D T t X Z P I),
 * UID  = real uid (cred->uid, global / init user namespace),
 * COMM = task->comm (may contain spaces; it is the last column).
 */
#include "common.h"

/* include/linux/sched.h (stable since 6.1; TASK_RTLOCK_WAIT since 5.15) */
#define TASK_REPORT		0x7f	/* R S D T t X Z P */
#define TASK_UNINTERRUPTIBLE	0x0002
#define TASK_NOLOAD		0x0400
#define TASK_IDLE		(TASK_UNINTERRUPTIBLE | TASK_NOLOAD)
#define TASK_RTLOCK_WAIT	0x1000
#define TASK_FROZEN		0x8000
#define TASK_REPORT_IDLE	0x80	/* TASK_REPORT + 1 */

/* Before 5.14 the field was called "state". */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline unsigned int task_raw_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

/* Mirrors __task_state_index() + task_state_array[] of fs/proc/array.c. */
static __always_inline char task_state_char(struct task_struct *t)
{
	unsigned int st = task_raw_state(t);
	unsigned int state = (st | (unsigned int)BPF_CORE_READ(t, exit_state)) & TASK_REPORT;

	if ((st & TASK_IDLE) == TASK_IDLE)
		state = TASK_REPORT_IDLE;
	if ((st & TASK_RTLOCK_WAIT) || (st & TASK_FROZEN))
		state = TASK_UNINTERRUPTIBLE;

	/* fls(state): index of the highest set bit, 1-based; 0 when state == 0 */
	if (state & 0x80) return 'I';
	if (state & 0x40) return 'P';
	if (state & 0x20) return 'Z';
	if (state & 0x10) return 'X';
	if (state & 0x08) return 't';
	if (state & 0x04) return 'T';
	if (state & 0x02) return 'D';
	if (state & 0x01) return 'S';
	return 'R';
}

SEC("iter/task")
int dump_tasks(struct bpf_iter__task *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct pid_namespace *ns;

	if (!task)
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "    PID    TGID    PPID S        UID COMM\n");

	ns = seq_pid_ns(seq);
	BPF_SEQ_PRINTF(seq, "%7d %7d %7d %c %10u %s\n",
		       pid_nr_in(BPF_CORE_READ(task, thread_pid), ns), tgid_in(task, ns),
		       tgid_in(BPF_CORE_READ(task, real_parent), ns), task_state_char(task),
		       BPF_CORE_READ(task, cred, uid.val), task->comm);
	return 0;
}
