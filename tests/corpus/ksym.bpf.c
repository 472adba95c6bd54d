// SPDX-License-Identifier: GPL-2.0-only
/*
 * ksym.bpf.c -- iter/ksym: every kernel symbol, as /proc/kallsyms lists them,
 * with where the symbol comes from:
 *     ADDRESS TYPE NAME [MODULE] KIND
 * KIND is CORE, MOD, FTRACE_MOD, BPF or KPROBE, from the kallsyms iterator's
 * section boundaries. Unlike the original, no symbol's size is printed: that
 * took the previous symbol's address from a global, which the kernel's re-run
 * of an object that overflows the seq_file buffer (and any second reader)
 * would see changed -- so the dump would depend on how it is read.
 *
 * The ksym iterator calls the program once more at the end, as every iterator
 * does, but with ctx->ksym still pointing at its iterator (other targets pass
 * NULL): the last symbol's name and value, and "__builtin__kprobes" as module,
 * left there by the failed lookup of one more kprobe symbol. The original
 * prints that as a last line; this skips it (kprobe symbols proper are named
 * kprobe_insn_page or kprobe_optinsn_page).
 *
 * Modeled on: Linux, tools/testing/selftests/bpf/progs/bpf_iter_ksym.c
 * (GPL-2.0). Written here for bpfdumpfs's tests (tests/corpus); no code copied.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

static __always_inline const char *kind_of(struct kallsym_iter *it)
{
	/* the iterator lists core symbols, then modules', ftrace's, BPF's and
	 * kprobes' in that order; each pos_*_end is where a part ends (0: not yet
	 * known, so the current symbol is in it) */
	if (!it->pos_mod_end || it->pos < it->pos_mod_end)
		return it->module_name[0] ? "MOD" : "CORE";
	if (!it->pos_ftrace_mod_end || it->pos < it->pos_ftrace_mod_end)
		return "FTRACE_MOD";
	if (!it->pos_bpf_end || it->pos < it->pos_bpf_end)
		return "BPF";
	return "KPROBE";
}

static __always_inline int starts_with(const char *s, const char *prefix, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] != prefix[i])
			return 0;
	return 1;
}

/* the end-of-dump call: see above */
static __always_inline int stale(struct kallsym_iter *it)
{
	return starts_with(it->module_name, "__builtin__kprobes", sizeof("__builtin__kprobes")) &&
	       !starts_with(it->name, "kprobe_", sizeof("kprobe_") - 1);
}

SEC("iter/ksym")
int corpus_ksym(struct bpf_iter__ksym *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct kallsym_iter *it = ctx->ksym;
	unsigned long addr;
	char type;

	if (!it || stale(it))
		return 0;
	if (ctx->meta->seq_num == 0)
		BPF_SEQ_PRINTF(seq, "ADDRESS          T NAME [MODULE] KIND\n");
	addr = it->show_value ? it->value : 0;
	type = it->type;
	if (it->module_name[0]) {
		/* as kallsyms shows them: upper case if exported, else lower */
		if (it->exported && type >= 'a' && type <= 'z')
			type -= 'a' - 'A';
		else if (!it->exported && type >= 'A' && type <= 'Z')
			type += 'a' - 'A';
		BPF_SEQ_PRINTF(seq, "%016lx %c %s [%s] %s\n", addr, type, it->name,
			       it->module_name, kind_of(it));
	} else {
		BPF_SEQ_PRINTF(seq, "%016lx %c %s %s\n", addr, type, it->name, kind_of(it));
	}
	return 0;
}
