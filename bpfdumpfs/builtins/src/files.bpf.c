/* task_file/files: every open file descriptor of every process.
 *
 * Format: one header line, then one line per (process, fd):
 *     PID      FD KIND   PATH
 *   "%7d %7u %-6s " PATH "\n"
 * PID  = the process's id in the pid namespace the seq_file was made in; only
 *        thread-group leaders are printed, so a file table shared by the
 *        threads of a process appears once.
 * KIND = file dir lnk chr blk fifo pipe socket anon (from f_inode->i_mode;
 *        "pipe" is a pipefs FIFO, "anon" an anon_inode or pidfs file).
 * PATH = bpf_d_path(&file->f_path): the same text as readlink /proc/PID/fd/FD
 *        ("/etc/passwd", "pipe:[123]", "socket:[456]", "anon_inode:[eventfd]",
 *        "/tmp/x (deleted)"). If d_path fails, the dentry name, or "-".
 *        A newline inside a path is printed as '?' to keep one line per fd
 *        (readlink shows it raw).
 */
#include "common.h"

#define S_IFMT   00170000
#define S_IFSOCK 0140000
#define S_IFLNK  0120000
#define S_IFREG  0100000
#define S_IFBLK  0060000
#define S_IFDIR  0040000
#define S_IFCHR  0020000
#define S_IFIFO  0010000

#define ANON_INODE_FS_MAGIC 0x09041934
#define PIPEFS_MAGIC        0x50495045
#define PID_FS_MAGIC        0x50494446

#define SMALL_BUF 256	/* on-stack fallback when the per-CPU buffer is busy */
#include "path.h"	/* after SMALL_BUF, which it uses */


static __always_inline const char *kind_of(struct inode *inode)
{
	unsigned int mode = BPF_CORE_READ(inode, i_mode);
	unsigned long magic = BPF_CORE_READ(inode, i_sb, s_magic);

	if (magic == ANON_INODE_FS_MAGIC || magic == PID_FS_MAGIC)
		return "anon";
	switch (mode & S_IFMT) {
	case S_IFREG:  return "file";
	case S_IFDIR:  return "dir";
	case S_IFLNK:  return "lnk";
	case S_IFCHR:  return "chr";
	case S_IFBLK:  return "blk";
	case S_IFSOCK: return "socket";
	case S_IFIFO:  return magic == PIPEFS_MAGIC ? "pipe" : "fifo";
	}
	return "anon";	/* no file type: an anonymous inode */
}

SEC("iter/task_file")
int dump_files(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	const char *kind;
	__u32 fd = ctx->fd;
	int pid;

	if (!task || !file)
		return 0;	/* the end-of-iteration call (same seq_num as the last object) */
	/* the header goes with the first object, before the thread filter below */
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "    PID      FD KIND   PATH\n");
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0;
	pid = tgid_in(task, seq_pid_ns(seq));

	kind = kind_of(BPF_CORE_READ(file, f_inode));

	BPF_SEQ_PRINTF(seq, "%7d %7u %-6s ", pid, fd, kind);

	put_d_path(seq, NULL, (struct path *)&file->f_path, file, true);
	return 0;
}
