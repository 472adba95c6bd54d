/* bpf_map/maps: every BPF map, one line each, bpftool-like:
 *   ID: TYPE  name NAME  flags 0xFLAGS  key KEYB  value VALUEB  max_entries N
 *   "%u: %s  name %s  flags 0x%x  key %uB  value %uB  max_entries %u\n"
 * TYPE is bpftool's name for the map type ("hash", "array", "ringbuf", ...),
 * or the decimal number for a type this object does not know. An unnamed map
 * shows "name -" (map names cannot contain '-'). No header; id order.
 */
#include "common.h"

/* enum bpf_map_type, in order; names as bpftool/libbpf print them */
static const char map_type_names[][24] = {
	"unspec", "hash", "array", "prog_array", "perf_event_array",
	"percpu_hash", "percpu_array", "stack_trace", "cgroup_array", "lru_hash",
	"lru_percpu_hash", "lpm_trie", "array_of_maps", "hash_of_maps", "devmap",
	"sockmap", "cpumap", "xskmap", "sockhash", "cgroup_storage",
	"reuseport_sockarray", "percpu_cgroup_storage", "queue", "stack", "sk_storage",
	"devmap_hash", "struct_ops", "ringbuf", "inode_storage", "task_storage",
	"bloom_filter", "user_ringbuf", "cgrp_storage", "arena",
};
#define N_MAP_TYPES (sizeof(map_type_names) / sizeof(map_type_names[0]))

SEC("iter/bpf_map")
int dump_maps(struct bpf_iter__bpf_map *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct bpf_map *map = ctx->map;
	const char *name;
	__u32 type;

	if (!map)
		return 0;
	type = map->map_type;
	name = map->name[0] ? map->name : "-";
	if (type < N_MAP_TYPES)
		BPF_SEQ_PRINTF(seq, "%u: %s  name %s  flags 0x%x  key %uB  value %uB  max_entries %u\n",
			       map->id, map_type_names[type], name, map->map_flags,
			       map->key_size, map->value_size, map->max_entries);
	else
		BPF_SEQ_PRINTF(seq, "%u: %u  name %s  flags 0x%x  key %uB  value %uB  max_entries %u\n",
			       map->id, type, name, map->map_flags,
			       map->key_size, map->value_size, map->max_entries);
	return 0;
}
