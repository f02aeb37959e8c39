// Guest helper of tests/vm/guest-tier.sh: one DMA_MAP_BENCHMARK run on the device bound to
// dma_map_benchmark (drives MAP/UNMAP requests through the virtio-iommu). Static build:
//   gcc -static -O2 -o dma-bench dma-bench.c
// Usage: dma-bench [SECONDS [THREADS [GRANULE_PAGES]]]   prints the kernel's averages, and one
// machine-readable line `dma-bench: threads=T granule=G map_100ns=M unmap_100ns=U`; exit 0 on
// success.
// The struct is the uAPI's (include/uapi/linux/map_benchmark.h); 6.12 and 7.x have the same size
// (7.x took one byte of expansion[] for map_mode, 0 = single mode).
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

struct map_benchmark {
    uint64_t avg_map_100ns, map_stddev, avg_unmap_100ns, unmap_stddev;
    uint32_t threads, seconds;
    int32_t node;
    uint32_t dma_bits, dma_dir, dma_trans_ns, granule;
    uint8_t map_mode;
    uint8_t expansion[75];
};
#define DMA_MAP_BENCHMARK _IOWR('d', 1, struct map_benchmark)

int main(int argc, char **argv) {
    struct map_benchmark m;
    memset(&m, 0, sizeof(m));
    m.seconds = argc > 1 ? (uint32_t)atoi(argv[1]) : 1;
    m.threads = argc > 2 ? (uint32_t)atoi(argv[2]) : 1;
    m.node = -1;
    m.dma_bits = 32;
    m.dma_dir = 0; /* DMA_MAP_BIDIRECTIONAL */
    m.granule = argc > 3 ? (uint32_t)atoi(argv[3]) : 1;
    int fd = open("/sys/kernel/debug/dma_map_benchmark", O_RDWR);
    if (fd < 0) {
        perror("dma-bench: open /sys/kernel/debug/dma_map_benchmark");
        return 1;
    }
    if (ioctl(fd, DMA_MAP_BENCHMARK, &m) < 0) {
        perror("dma-bench: DMA_MAP_BENCHMARK");
        return 1;
    }
    printf("dma-bench: %us map avg %llu.%llu us (stddev %llu.%llu) unmap avg %llu.%llu us (stddev %llu.%llu)\n",
           m.seconds, (unsigned long long)m.avg_map_100ns / 10, (unsigned long long)m.avg_map_100ns % 10,
           (unsigned long long)m.map_stddev / 10, (unsigned long long)m.map_stddev % 10,
           (unsigned long long)m.avg_unmap_100ns / 10, (unsigned long long)m.avg_unmap_100ns % 10,
           (unsigned long long)m.unmap_stddev / 10, (unsigned long long)m.unmap_stddev % 10);
    printf("dma-bench: threads=%u granule=%u map_100ns=%llu unmap_100ns=%llu\n", m.threads, m.granule,
           (unsigned long long)m.avg_map_100ns, (unsigned long long)m.avg_unmap_100ns);
    return 0;
}
