/* task_file (pid = the helper): a header, one 300-byte FD_LINE per fd, a
 * footer. 20,000 fds make 6 MB that read the same on every open. */
#include "fidelity.h"

SEC("iter/task_file")
int fid_big(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;

	if (!ctx->task || !ctx->file) {	/* the epilogue */
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "# fidelity big: fd check pad\n");
	fd_line(seq, ctx->fd);
	return 0;
}
