/* An iterator of a target no kernel has: `add` refuses it by name. */
#include "common.h"

SEC("iter/nonexistent")
int dump_none(struct bpf_iter__task *ctx) { return 0; }
