/* task_file (pid = the helper): FD_LINE for each fd below 3,000, except that
 * fd E2BIG_FD prints 40,000 bytes (40 x 1,000 filler bytes): more than the
 * whole 32 KiB seq_file buffer, so the read that reaches it fails with E2BIG
 * (and so does every later read of that seq_file). */
#include "fidelity.h"

#define PRINTED_FDS 3000
#define E2BIG_FD 2500
#define CHUNKS 40

SEC("iter/task_file")
int fid_e2big(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u32 fd = ctx->fd;

	if (!ctx->task || !ctx->file) {
		BPF_SEQ_PRINTF(seq, "# end\n");
		return 0;
	}
	if (fd >= PRINTED_FDS)
		return 0;
	if (fd == E2BIG_FD) {
		for (int i = 0; i < CHUNKS; i++)
			bpf_seq_write(seq, (void *)filler, 1000);
		return 0;
	}
	fd_line(seq, fd);
	return 0;
}
