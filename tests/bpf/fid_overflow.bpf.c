/* task_file (pid = the helper): about 3,000 bytes for each fd below 2,000
 * (nothing for the others), so the 32 KiB seq_file buffer holds ten or so:
 * the fd whose output does not fit is dropped and re-run on the next read.
 *   "fd %05u " + filler[fd % 64 .. +len) + "\n",  len = 2900 + (fd % 16) * 5
 * Global `reruns` counts visits of an fd already visited in the same session
 * (the kernel re-running a dropped object), so a test can prove it happened. */
#include "fidelity.h"
#include "visits.h"

#define PRINTED_FDS 2000

__u64 reruns = 0;

SEC("iter/task_file")
int fid_overflow(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u32 fd = ctx->fd, off, len;

	if (!ctx->task || !ctx->file) {
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	if (fd >= PRINTED_FDS)
		return 0;
	if (visit(fd, ctx->meta->session_id) > 0)
		__sync_fetch_and_add(&reruns, 1);
	off = fd & 63;
	len = 2900 + (fd & 15) * 5;
	BPF_SEQ_PRINTF(seq, "fd %05u ", fd);
	if (off < 64 && len <= 2975)	/* for the verifier */
		bpf_seq_write(seq, (void *)filler + off, len);
	bpf_seq_write(seq, "\n", 1);
	return 0;
}
