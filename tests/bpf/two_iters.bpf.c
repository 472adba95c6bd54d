/* Two iterator programs in one object: `add` must be told which (--prog). */
#include "common.h"

SEC("iter/task")
int first(struct bpf_iter__task *ctx) { return 0; }

SEC("iter/ksym")
int second(struct bpf_iter__ksym *ctx) { return 0; }
