/* ksym/kallsyms: the kernel symbol table, byte for byte in /proc/kallsyms'
 * format (kernel/kallsyms.c s_show):
 *   "%016lx %c %s\n"          core kernel symbols
 *   "%016lx %c %s\t[%s]\n"    symbols with a module name: modules, [bpf],
 *                             [__builtin__ftrace], [__builtin__kprobes]
 *                             (type upper-case if exported, else lower-case)
 * The address is 0 when the opener may not see addresses (kptr_restrict),
 * exactly like /proc/kallsyms. Symbols with an empty name are skipped. No
 * header.
 *
 * Kernel quirk (seen on 6.18): the end-of-iteration call does not get a NULL
 * ksym but the iterator state left by the failed lookup past the last symbol:
 * the previous symbol's name and value with module "__builtin__kprobes". It
 * is recognised by its position: for module/bpf/ftrace/kprobe symbols
 * (module_name set) ksym->pos equals meta->seq_num, and the final call has
 * pos == seq_num + 1. (Core symbols have pos == seq_num + 1 and no module.)
 */
#include "common.h"

SEC("iter/ksym")
int dump_kallsyms(struct bpf_iter__ksym *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct kallsym_iter *it = ctx->ksym;
	unsigned long value;
	char type;

	if (!it || !it->name[0])
		return 0;
	if (it->module_name[0] && it->pos != ctx->meta->seq_num)
		return 0;	/* the end-of-iteration call, see above */
	value = it->show_value ? it->value : 0;
	type = it->type;
	if (it->module_name[0]) {
		/* "global" if exported, "local" otherwise */
		if (it->exported) {
			if (type >= 'a' && type <= 'z')
				type -= 'a' - 'A';
		} else if (type >= 'A' && type <= 'Z') {
			type += 'a' - 'A';
		}
	}
	/* One string per call: bpf_seq_printf copies at most 512 bytes of string
	 * arguments per call, and a name may be 511 characters long. */
	BPF_SEQ_PRINTF(seq, "%016lx %c ", value, type);
	BPF_SEQ_PRINTF(seq, "%s", it->name);
	if (it->module_name[0])
		BPF_SEQ_PRINTF(seq, "\t[%s]\n", it->module_name);
	else
		BPF_SEQ_PRINTF(seq, "\n");
	return 0;
}
