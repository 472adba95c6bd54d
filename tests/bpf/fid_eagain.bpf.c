/* task_file (pid = the helper): FD_LINE for each fd below 8,000 (nothing for
 * the others), but the program returns 1 ("run this object again": the
 * kernel's read fails with EAGAIN if nothing is buffered) on the first two
 * visits of every odd fd in a session, and prints on the third. The first
 * refusal comes after other lines are buffered (that read returns them); the
 * second is the first object of the next read, which fails with EAGAIN. */
#include "fidelity.h"
#include "visits.h"

#define PRINTED_FDS 8000

SEC("iter/task_file")
int fid_eagain(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u32 fd = ctx->fd;

	if (!ctx->task || !ctx->file) {
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	if (fd >= PRINTED_FDS)
		return 0;
	if ((fd & 1) && visit(fd, ctx->meta->session_id) < 2)
		return 1;
	fd_line(seq, fd);
	return 0;
}
