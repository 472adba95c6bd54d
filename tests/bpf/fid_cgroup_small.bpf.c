/* cgroup: 700 filler bytes per cgroup (see cgroup_dumper.h). */
#define PAD_LEN 700
#include "cgroup_dumper.h"
