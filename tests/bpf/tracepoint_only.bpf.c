/* No iterator program at all: `add` refuses it. */
#include "common.h"

SEC("tracepoint/syscalls/sys_enter_openat")
int on_openat(void *ctx) { return 0; }
