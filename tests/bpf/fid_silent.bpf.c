/* task_file (pid = a helper whose threads hold more than a million fds in
 * separate fd tables): prints nothing for the first SILENT objects, then
 * "obj SEQ_NUM tid-fd FD\n" for each later one, and "# end" after the last.
 * The first read visits a million objects without output and the kernel
 * gives EAGAIN; the next read goes on from where it stopped. */
#include "fidelity.h"

#define SILENT 1000050

SEC("iter/task_file")
int fid_silent(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u64 n = ctx->meta->seq_num;

	if (!ctx->task || !ctx->file) {
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	if (n >= SILENT)
		BPF_SEQ_PRINTF(seq, "obj %07llu fd %05u\n", n, ctx->fd);
	return 0;
}
