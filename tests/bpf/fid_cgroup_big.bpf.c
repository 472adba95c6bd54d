/* cgroup: 4,000 filler bytes per cgroup (see cgroup_dumper.h). */
#define PAD_LEN 4000
#include "cgroup_dumper.h"
