// Guest helper of tests/vm/guest-tier.sh: a user-space driver of VFIO devices behind our
// virtio-iommu. It puts the groups of the devices named (BDF, or BDF,BDF: one container, so
// type1 attaches the second group to the first one's domain) in one container, maps three pages
// of its own memory at chosen IOVAs through VFIO type1 (each a MAP request to our device, or in
// page-table mode an edit of the domain's table), prints `vfio-map: iova=0x.. gpa=0x..` per page (the guest-physical
// address from /proc/self/pagemap) and `vfio-map: ready`, waits while the host's control socket
// checks each translation, unmaps, prints `vfio-map: unmapped`, and waits again for the host to
// see the faults. Static build: gcc -static -O2 -o vfio-map vfio-map.c
// Usage: vfio-map BDF[,BDF] SECONDS
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 3
#define IOVA_BASE 0x100000000ULL
#define IOVA_STRIDE 0x10000ULL

static int die(const char *what) {
    fprintf(stderr, "vfio-map: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vfio-map BDF[,BDF] SECONDS\n");
        return 2;
    }
    unsigned wait_s = (unsigned)atoi(argv[2]);
    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0) return die("open /dev/vfio/vfio");
    int ngroups = 0;
    for (char *bdf = strtok(argv[1], ","); bdf; bdf = strtok(NULL, ",")) {
        char path[512], link[256];
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
        ssize_t n = readlink(path, link, sizeof(link) - 1);
        if (n < 0) return die("iommu_group");
        link[n] = 0;
        const char *g = strrchr(link, '/');
        snprintf(path, sizeof(path), "/dev/vfio/%s", g ? g + 1 : link);
        int group = open(path, O_RDWR);
        if (group < 0) return die(path);
        struct vfio_group_status st = {.argsz = sizeof(st)};
        if (ioctl(group, VFIO_GROUP_GET_STATUS, &st) < 0) return die("VFIO_GROUP_GET_STATUS");
        if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE)) {
            fprintf(stderr, "vfio-map: group of %s not viable\n", bdf);
            return 1;
        }
        if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) return die("VFIO_GROUP_SET_CONTAINER");
        // The IOMMU is chosen once, with the first group; later groups join its domain.
        if (ngroups++ == 0 && ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
            return die("VFIO_SET_IOMMU");
        printf("vfio-map: group %s of %s in the container\n", g ? g + 1 : link, bdf);
    }

    long page = sysconf(_SC_PAGESIZE);
    uint8_t *buf = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return die("mmap");
    memset(buf, 0x5a, PAGES * page);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0) return die("pagemap");
    for (int i = 0; i < PAGES; i++) {
        struct vfio_iommu_type1_dma_map m = {
            .argsz = sizeof(m),
            .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            .vaddr = (uint64_t)(uintptr_t)(buf + i * page),
            .iova = IOVA_BASE + i * IOVA_STRIDE,
            .size = (uint64_t)page,
        };
        if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m) < 0) return die("VFIO_IOMMU_MAP_DMA");
        // Pinned by the map: the PFN is stable now.
        uint64_t e = 0;
        off_t off = (off_t)(((uintptr_t)(buf + i * page)) / page) * 8;
        if (pread(pm, &e, 8, off) != 8) return die("pagemap read");
        if (!(e >> 63)) {
            fprintf(stderr, "vfio-map: page %d not present\n", i);
            return 1;
        }
        uint64_t gpa = (e & ((1ULL << 55) - 1)) * (uint64_t)page;
        printf("vfio-map: iova=0x%llx gpa=0x%llx\n", (unsigned long long)m.iova, (unsigned long long)gpa);
    }
    printf("vfio-map: ready\n");
    fflush(stdout);
    sleep(wait_s);
    for (int i = 0; i < PAGES; i++) {
        struct vfio_iommu_type1_dma_unmap u = {
            .argsz = sizeof(u),
            .iova = IOVA_BASE + i * IOVA_STRIDE,
            .size = (uint64_t)page,
        };
        if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u) < 0) return die("VFIO_IOMMU_UNMAP_DMA");
    }
    printf("vfio-map: unmapped\n");
    fflush(stdout);
    sleep(wait_s);
    return 0;
}
