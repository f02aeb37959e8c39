// Guest helper of tests/vm/guest-tier.sh (the sva boot): shared virtual addressing through our
// virtio-iommu (contrib/linux patches 0004 and 0005). It maps five pages of its own memory:
//   0 pattern   written with a pattern before the bind
//   1 untouched never touched: the endpoint's access is a page request
//   2 readonly  only read (the zero page, mapped read-only): the endpoint's write is a page
//               request for write access, which makes it writable (copy on write)
//   3 unmap     written, later unmapped: the mmu notifier's INVALIDATE, then the access faults
//   4 flag      written by the host through the endpoint to say a step is done
// and one more page, `uffd`, registered with a userfaultfd (UFFDIO_REGISTER_MODE_MISSING, not
// UFFD_USER_MODE_ONLY) and never touched: the endpoint's access there is a page request whose
// fault reaches handle_userfault. It binds its address space to the endpoint (the test-only
// debugfs file of patch 0005), prints the PASID and the addresses (`sva-test: NAME=0x...`), waits
// for the host's flag 1, checks that it sees the host's write into page 2, unmaps page 3, waits
// for flag 2, says whether the userfaultfd got a fault (`sva-test: uffd-event ...` or
// `sva-test: uffd-no-event`; it never resolves one) and exits, which unbinds.
// Prints `PASS name` / `FAIL name` for its own checks. Static build: gcc -static -O2
// Usage: sva-test BDF TIMEOUT_SECONDS
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BIND "/sys/kernel/debug/virtio-iommu-sva-test/bind"
#define PAGES 5
#define PATTERN_LEN 64
// What the host writes into the read-only page (guest-tier.sh: the same bytes).
#define DEVICE_BYTE 0x5a
#define DEVICE_LEN 16

// How long the program looks for a userfaultfd event after flag 2 (the host's page request at
// the uffd page was raised before it wrote flag 2).
#define UFFD_WAIT_MS 3000

static int die(const char *what) {
    printf("FAIL sva-test (%s: %s)\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

// Wait until the host wrote `want` into the flag page (through the endpoint, at the PASID).
static int wait_flag(volatile uint8_t *flag, uint8_t want, unsigned timeout_s) {
    struct timespec t = {0, 10 * 1000 * 1000};
    for (unsigned i = 0; i < timeout_s * 100; i++) {
        if (*flag == want) return 0;
        nanosleep(&t, NULL);
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: sva-test BDF TIMEOUT_SECONDS\n");
        return 2;
    }
    unsigned timeout_s = (unsigned)atoi(argv[2]);
    long page = sysconf(_SC_PAGESIZE);
    uint8_t *buf = mmap(NULL, PAGES * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return die("mmap");
    uint8_t *pattern = buf, *untouched = buf + page, *readonly = buf + 2 * page;
    uint8_t *unmap = buf + 3 * page;
    volatile uint8_t *flag = buf + 4 * page;

    for (int i = 0; i < PATTERN_LEN; i++) pattern[i] = (uint8_t)(0xc3 ^ (i * 7));
    volatile uint8_t sink = readonly[0]; // maps the zero page, read-only
    (void)sink;
    memset(unmap, 0x11, page);
    *flag = 0;

    // Not UFFD_USER_MODE_ONLY: the IOPF handler's fault is not a user-mode fault of this task.
    uint8_t *uffd_page = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (uffd_page == MAP_FAILED) return die("mmap uffd page");
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) return die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(uffd, UFFDIO_API, &api)) return die("UFFDIO_API");
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)uffd_page, .len = (uint64_t)page},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) return die("UFFDIO_REGISTER");

    int fd = open(BIND, O_RDWR);
    if (fd < 0) return die("open " BIND);
    const char *bdf = argv[1];
    if (write(fd, bdf, strlen(bdf)) != (ssize_t)strlen(bdf)) return die("bind");
    char pasid[16] = {0};
    if (read(fd, pasid, sizeof(pasid) - 1) <= 0) return die("read the PASID");
    pasid[strcspn(pasid, "\n")] = 0;

    printf("sva-test: pasid=%s\n", pasid);
    printf("sva-test: pattern=0x%llx len=%d hex=", (unsigned long long)(uintptr_t)pattern, PATTERN_LEN);
    for (int i = 0; i < PATTERN_LEN; i++) printf("%02x", pattern[i]);
    printf("\n");
    printf("sva-test: untouched=0x%llx\n", (unsigned long long)(uintptr_t)untouched);
    printf("sva-test: readonly=0x%llx\n", (unsigned long long)(uintptr_t)readonly);
    printf("sva-test: unmap=0x%llx\n", (unsigned long long)(uintptr_t)unmap);
    printf("sva-test: flag=0x%llx\n", (unsigned long long)(uintptr_t)flag);
    printf("sva-test: uffd=0x%llx\n", (unsigned long long)(uintptr_t)uffd_page);
    printf("sva-test: ready\n");
    fflush(stdout);

    if (wait_flag(flag, 1, timeout_s)) {
        printf("FAIL host-flag-1 (no write from the host in %u s)\n", timeout_s);
    } else {
        printf("PASS host-flag-1\n");
        int ok = 1;
        for (int i = 0; i < DEVICE_LEN; i++) ok &= readonly[i] == DEVICE_BYTE;
        if (ok)
            printf("PASS guest-sees-device-write\n");
        else
            printf("FAIL guest-sees-device-write (read-only page holds %02x, want %02x)\n", readonly[0],
                   DEVICE_BYTE);
    }
    fflush(stdout);

    if (munmap(unmap, page)) return die("munmap");
    printf("sva-test: unmapped\n");
    fflush(stdout);
    if (wait_flag(flag, 2, timeout_s))
        printf("FAIL host-flag-2 (no write from the host in %u s)\n", timeout_s);
    else
        printf("PASS host-flag-2\n");
    // The host raised its page request at the uffd page before flag 2. If the IOPF handler's
    // fault waits in handle_userfault, the event is here; we never resolve it, so it stays
    // pending until we exit. If the fault fails at once, no event comes.
    struct pollfd pfd = {.fd = uffd, .events = POLLIN};
    struct uffd_msg msg;
    if (poll(&pfd, 1, UFFD_WAIT_MS) == 1 && read(uffd, &msg, sizeof(msg)) == (ssize_t)sizeof(msg))
        printf("sva-test: uffd-event event=%u address=0x%llx flags=0x%llx\n", msg.event,
               (unsigned long long)msg.arg.pagefault.address, (unsigned long long)msg.arg.pagefault.flags);
    else
        printf("sva-test: uffd-no-event\n");
    fflush(stdout);
    // Exit without closing: the mm goes first (the mmu notifier's release), then the files
    // (the unbind, the userfaultfd).
    printf("sva-test: exiting\n");
    fflush(stdout);
    return 0;
}
