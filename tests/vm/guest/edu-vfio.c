// Second-level guest helper of the kernel tier's nested boot (tests/vm/mknested.sh builds it
// static into the L2 initramfs): the guest's driver of the edu that QEMU 11 assigns with vfio-pci,
// behind OUR virtio-iommu (vhost-user, QEMU the frontend). Through VFIO type1 on the guest kernel's
// virtio-iommu driver it maps two pages of its own memory (each a MAP request to our backend),
// has the edu copy page A to page B (DMA read, DMA write), then unmaps page B (an UNMAP request)
// and has the edu write there again: nothing may move. The IOVAs lie inside the guest's RAM, where
// QEMU's own IOAS maps guest-physical addresses: only our tables send the DMA to pages A and B.
// Prints `edu-vfio: PASS|FAIL name` lines. Static build: gcc -static -O2 -o edu-vfio edu-vfio.c
// Usage: edu-vfio BDF
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define IOVA_A 0x100000ULL
#define IOVA_B 0x200000ULL
#define DST 0x400
#define XFER 2048
#define EDU_BUF 0x40000ULL
#define FILL 0x5a

static int die(const char *what) {
    printf("edu-vfio: FAIL %s (%s)\n", what, strerror(errno));
    return 1;
}

static volatile uint8_t *bar;
static uint64_t rd64(unsigned r) { return *(volatile uint64_t *)(bar + r); }
static void wr64(unsigned r, uint64_t v) { *(volatile uint64_t *)(bar + r) = v; }

// One edu transfer (registers: tests/support/edu.rs); 0 when the engine finished.
static int dma(uint64_t src, uint64_t dst, uint64_t len, uint64_t to_ram) {
    wr64(0x80, src);
    wr64(0x88, dst);
    wr64(0x90, len);
    wr64(0x98, 1 | (to_ram << 1));
    for (int i = 0; i < 2000; i++) {
        if (!(rd64(0x98) & 1)) return 0;
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

static int all(const uint8_t *p, size_t n, uint8_t b) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != b) return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: edu-vfio BDF\n");
        return 2;
    }
    char path[512], link[256];
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", argv[1]);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n < 0) return die("iommu_group");
    link[n] = 0;
    const char *g = strrchr(link, '/');
    snprintf(path, sizeof(path), "/dev/vfio/%s", g ? g + 1 : link);
    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0) return die("open /dev/vfio/vfio");
    int group = open(path, O_RDWR);
    if (group < 0) return die(path);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) return die("VFIO_GROUP_SET_CONTAINER");
    // The guest kernel attaches the group to a new domain: an ATTACH request to our device.
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) return die("VFIO_SET_IOMMU");
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[1]);
    if (dev < 0) return die("VFIO_GROUP_GET_DEVICE_FD");

    struct vfio_region_info cfg = {.argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX};
    struct vfio_region_info b0 = {.argsz = sizeof(b0), .index = VFIO_PCI_BAR0_REGION_INDEX};
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg) < 0 || ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &b0) < 0)
        return die("VFIO_DEVICE_GET_REGION_INFO");
    bar = mmap(NULL, b0.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, (off_t)b0.offset);
    if (bar == MAP_FAILED) return die("mmap BAR0");
    uint16_t cmd = 0;
    if (pread(dev, &cmd, 2, (off_t)cfg.offset + 4) != 2) return die("read PCI_COMMAND");
    cmd |= 0x2 | 0x4 | 0x400; // memory, bus master, INTx off
    if (pwrite(dev, &cmd, 2, (off_t)cfg.offset + 4) != 2) return die("write PCI_COMMAND");
    uint32_t id = *(volatile uint32_t *)bar;
    if (id != 0x010000ed) {
        printf("edu-vfio: FAIL edu-id (reads 0x%x)\n", id);
        return 1;
    }

    long page = sysconf(_SC_PAGESIZE);
    uint8_t *buf = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return die("mmap");
    uint8_t *a = buf, *b = buf + page;
    for (long i = 0; i < page; i++) a[i] = (uint8_t)(i * 7 + 3);
    memset(b, FILL, page);
    uint64_t iova[2] = {IOVA_A, IOVA_B};
    for (int i = 0; i < 2; i++) {
        struct vfio_iommu_type1_dma_map m = {
            .argsz = sizeof(m),
            .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            .vaddr = (uint64_t)(uintptr_t)(buf + i * page),
            .iova = iova[i],
            .size = (uint64_t)page,
        };
        if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m) < 0) return die("VFIO_IOMMU_MAP_DMA");
    }
    int failed = 0;
#define CHECK(name, ok)                                                                            \
    do {                                                                                           \
        if (ok) {                                                                                  \
            printf("edu-vfio: PASS %s\n", name);                                                   \
        } else {                                                                                   \
            printf("edu-vfio: FAIL %s\n", name);                                                   \
            failed++;                                                                              \
        }                                                                                          \
    } while (0)
    // Page A -> the edu's buffer -> page B at DST.
    int r = dma(IOVA_A, EDU_BUF, XFER, 0) || dma(EDU_BUF, IOVA_B + DST, XFER, 1);
    CHECK("edu-dma-runs", r == 0);
    CHECK("edu-dma-follows-our-maps",
          all(b, DST, FILL) && !memcmp(b + DST, a, XFER) && all(b + DST + XFER, page - DST - XFER, FILL));

    // UNMAP page B; the same write must move nothing.
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof(u), .iova = IOVA_B, .size = (uint64_t)page};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u) < 0) return die("VFIO_IOMMU_UNMAP_DMA");
    memset(b, FILL, page);
    r = dma(EDU_BUF, IOVA_B + DST, 4, 1);
    CHECK("edu-dma-after-unmap-ends", r == 0);
    CHECK("edu-dma-after-unmap-moves-nothing", all(b, page, FILL));
    printf("edu-vfio: done, %d failed\n", failed);
    return failed ? 1 : 0;
}
