// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * smmu3-check: drives ARM SMMUv3 nesting through Linux iommufd from inside the arm64 test guest
 * (tests/vm/arm64-tier.sh, QEMU virt with iommu=smmuv3, stage=nested). Built static on the host
 * with aarch64-linux-gnu-gcc against the uapi headers (make headers_install) of the guest kernel.
 *
 * Usage: smmu3-check [/dev/vfio/devices/vfioN]   (default: $VIOMMU_VFIO_CDEV)
 * Prints one `PASS step` or `FAIL step (errno N: text)` line per step, plus `smmu3: ...` info
 * lines. Exit status 0 if every step passed, 1 otherwise. A step whose prerequisite failed is
 * reported as `FAIL step (skipped: ...)` so that the count stays the same from run to run.
 *
 * Steps: open /dev/iommu and the cdev; VFIO_DEVICE_BIND_IOMMUFD; IOMMU_GET_HW_INFO (expects
 * IOMMU_HW_INFO_TYPE_ARM_SMMUV3, prints IDR0..5); IOMMU_IOAS_ALLOC; IOMMU_IOAS_MAP of a small
 * anonymous buffer at a fixed IOVA; IOMMU_HWPT_ALLOC(NEST_PARENT) on the IOAS;
 * IOMMU_VIOMMU_ALLOC(ARM_SMMUV3) on it; IOMMU_VDEVICE_ALLOC (virt_id VSID); then for three vSTEs
 * (Cfg=abort, Cfg=bypass, Cfg=S1 translate with a linear one-entry CD table inside the mapped
 * buffer): IOMMU_HWPT_ALLOC nested (IOMMU_HWPT_DATA_ARM_SMMUV3) on the vIOMMU,
 * VFIO_DEVICE_ATTACH_IOMMUFD_PT; for S1 also IOMMU_HWPT_INVALIDATE on the vIOMMU with
 * CMDQ_OP_TLBI_NH_ALL and CMDQ_OP_CFGI_CD_ALL(SID=VSID); then detach and destroy everything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/iommufd.h>
#include <linux/vfio.h>

#define VSID 0x8u
#define MAP_IOVA 0x10000000ull /* 256 MiB: clear of the SMMU's software MSI window at 0x8000000 */
#define MAP_LEN 0x10000ull
#define CD_OFFSET 0x1000ull /* S1ContextPtr = MAP_IOVA + CD_OFFSET (64-byte aligned) */

/* SMMUv3 STE word 0 and command encodings (SMMUv3 spec 5.2, 4.x; arm-smmu-v3.h) */
#define STE0_V (1ull << 0)
#define STE0_CFG(x) ((uint64_t)(x) << 1)
#define STE0_CFG_ABORT 0u
#define STE0_CFG_BYPASS 4u
#define STE0_CFG_S1_TRANS 5u
#define STE0_S1FMT_LINEAR (0ull << 4)
#define STE0_S1CTXPTR_MASK 0x000ffffffffffffc0ull /* bits 51:6 */
#define STE0_S1CDMAX(x) ((uint64_t)(x) << 59)
#define CMDQ_OP_CFGI_CD_ALL 0x06ull
#define CMDQ_OP_TLBI_NH_ALL 0x10ull
#define CMDQ_CFGI_0_SID(x) ((uint64_t)(x) << 32)

static int failures;

static void pass(const char *step) { printf("PASS %s\n", step); fflush(stdout); }

static void fail_errno(const char *step, int err)
{
	printf("FAIL %s (errno %d: %s)\n", step, err, strerror(err));
	fflush(stdout);
	failures++;
}

static void fail_msg(const char *step, const char *msg)
{
	printf("FAIL %s (%s)\n", step, msg);
	fflush(stdout);
	failures++;
}

/* ioctl with the step's PASS/FAIL line; returns 0 on success, else the errno */
static int step_ioctl(const char *step, int fd, unsigned long req, void *arg)
{
	if (ioctl(fd, req, arg) == 0) {
		pass(step);
		return 0;
	}
	int err = errno;
	fail_errno(step, err);
	return err ? err : EIO;
}

static int destroy(int iommufd, uint32_t id, const char *step)
{
	struct iommu_destroy d = { .size = sizeof(d), .id = id };

	return step_ioctl(step, iommufd, IOMMU_DESTROY, &d);
}

static void skip(const char *step, const char *why)
{
	char buf[160];

	snprintf(buf, sizeof(buf), "skipped: %s", why);
	fail_msg(step, buf);
}

/*
 * One nested configuration: alloc the nested HWPT with the given vSTE, attach the device, optionally
 * invalidate, detach, destroy. Step names are prefixed with `name`.
 */
static void nested_round(int iommufd, int devfd, uint32_t dev_id, uint32_t viommu_id,
			 const char *name, uint64_t ste0, int invalidate)
{
	char step[96];
	struct iommu_hwpt_arm_smmuv3 vste = { .ste = { ste0, 0 } };
	struct iommu_hwpt_alloc alloc = {
		.size = sizeof(alloc),
		.dev_id = dev_id,
		.pt_id = viommu_id,
		.data_type = IOMMU_HWPT_DATA_ARM_SMMUV3,
		.data_len = sizeof(vste),
		.data_uptr = (uintptr_t)&vste,
	};
	int attached = 0;

	printf("smmu3: %s vSTE word0 0x%016" PRIx64 "\n", name, ste0);
	snprintf(step, sizeof(step), "smmu3-%s-hwpt-alloc-nested", name);
	if (step_ioctl(step, iommufd, IOMMU_HWPT_ALLOC, &alloc)) {
		snprintf(step, sizeof(step), "smmu3-%s-attach", name);
		skip(step, "no nested HWPT");
		if (invalidate) {
			snprintf(step, sizeof(step), "smmu3-%s-invalidate", name);
			skip(step, "no nested HWPT");
		}
		snprintf(step, sizeof(step), "smmu3-%s-detach", name);
		skip(step, "no nested HWPT");
		snprintf(step, sizeof(step), "smmu3-%s-hwpt-destroy", name);
		skip(step, "no nested HWPT");
		return;
	}
	printf("smmu3: %s nested hwpt id %u\n", name, alloc.out_hwpt_id);

	struct vfio_device_attach_iommufd_pt at = {
		.argsz = sizeof(at),
		.pt_id = alloc.out_hwpt_id,
	};
	snprintf(step, sizeof(step), "smmu3-%s-attach", name);
	attached = step_ioctl(step, devfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at) == 0;

	if (invalidate) {
		/* entry_len 16: struct iommu_viommu_arm_smmuv3_invalidate, little-endian commands */
		struct iommu_viommu_arm_smmuv3_invalidate cmds[2] = {
			{ .cmd = { CMDQ_OP_TLBI_NH_ALL, 0 } },
			{ .cmd = { CMDQ_OP_CFGI_CD_ALL | CMDQ_CFGI_0_SID(VSID), 0 } },
		};
		struct iommu_hwpt_invalidate inv = {
			.size = sizeof(inv),
			.hwpt_id = viommu_id,
			.data_uptr = (uintptr_t)cmds,
			.data_type = IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
			.entry_len = sizeof(cmds[0]),
			.entry_num = 2,
		};
		snprintf(step, sizeof(step), "smmu3-%s-invalidate", name);
		if (sizeof(cmds[0]) != 16) {
			fail_msg(step, "struct iommu_viommu_arm_smmuv3_invalidate is not 16 bytes");
		} else if (!attached) {
			skip(step, "device not attached");
		} else if (ioctl(iommufd, IOMMU_HWPT_INVALIDATE, &inv) == 0 && inv.entry_num == 2) {
			pass(step);
		} else {
			int err = errno;
			char buf[128];

			snprintf(buf, sizeof(buf), "errno %d: %s; %u of 2 commands handled", err,
				 strerror(err), inv.entry_num);
			fail_msg(step, buf);
		}
	}

	snprintf(step, sizeof(step), "smmu3-%s-detach", name);
	if (attached) {
		struct vfio_device_detach_iommufd_pt dt = { .argsz = sizeof(dt) };

		step_ioctl(step, devfd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &dt);
	} else {
		skip(step, "device not attached");
	}
	snprintf(step, sizeof(step), "smmu3-%s-hwpt-destroy", name);
	destroy(iommufd, alloc.out_hwpt_id, step);
}

int main(int argc, char **argv)
{
	const char *cdev = argc > 1 ? argv[1] : getenv("VIOMMU_VFIO_CDEV");
	int iommufd, devfd;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!cdev || !*cdev) {
		fail_msg("smmu3-args", "no VFIO cdev (argument or VIOMMU_VFIO_CDEV)");
		return 1;
	}
	printf("smmu3: cdev %s, vSID 0x%x\n", cdev, VSID);

	iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (iommufd < 0) {
		fail_errno("smmu3-open-dev-iommu", errno);
		return 1;
	}
	pass("smmu3-open-dev-iommu");
	devfd = open(cdev, O_RDWR | O_CLOEXEC);
	if (devfd < 0) {
		fail_errno("smmu3-open-vfio-cdev", errno);
		return 1;
	}
	pass("smmu3-open-vfio-cdev");

	struct vfio_device_bind_iommufd bind = {
		.argsz = sizeof(bind),
		.iommufd = iommufd,
	};
	if (step_ioctl("smmu3-vfio-bind-iommufd", devfd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		return 1;
	uint32_t dev_id = bind.out_devid;
	printf("smmu3: dev_id %u\n", dev_id);

	struct iommu_hw_info_arm_smmuv3 info = { 0 };
	struct iommu_hw_info hw = {
		.size = sizeof(hw),
		.dev_id = dev_id,
		.data_len = sizeof(info),
		.data_uptr = (uintptr_t)&info,
	};
	if (ioctl(iommufd, IOMMU_GET_HW_INFO, &hw)) {
		fail_errno("smmu3-get-hw-info", errno);
	} else if (hw.out_data_type != IOMMU_HW_INFO_TYPE_ARM_SMMUV3) {
		char buf[80];

		snprintf(buf, sizeof(buf), "out_data_type %u, want IOMMU_HW_INFO_TYPE_ARM_SMMUV3 (%u)",
			 hw.out_data_type, IOMMU_HW_INFO_TYPE_ARM_SMMUV3);
		fail_msg("smmu3-get-hw-info", buf);
	} else {
		pass("smmu3-get-hw-info");
	}
	printf("smmu3: hw_info type %u len %u flags 0x%x iidr 0x%08x aidr 0x%08x caps 0x%llx max_pasid_log2 %u\n",
	       hw.out_data_type, hw.data_len, info.flags, info.iidr, info.aidr,
	       (unsigned long long)hw.out_capabilities, hw.out_max_pasid_log2);
	for (int i = 0; i < 6; i++)
		printf("smmu3: idr[%d] 0x%08x\n", i, info.idr[i]);
	printf("smmu3: IDR0.S1P %u IDR0.S2P %u IDR0.COHACC %u IDR3.FWB %u\n", (info.idr[0] >> 1) & 1,
	       info.idr[0] & 1, (info.idr[0] >> 4) & 1, (info.idr[3] >> 8) & 1);

	struct iommu_ioas_alloc ioas = { .size = sizeof(ioas) };
	if (step_ioctl("smmu3-ioas-alloc", iommufd, IOMMU_IOAS_ALLOC, &ioas))
		return 1;

	void *buf = mmap(NULL, MAP_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		fail_errno("smmu3-ioas-map", errno);
		return 1;
	}
	memset(buf, 0, MAP_LEN); /* the CD at CD_OFFSET stays all-zero (V=0): no DMA happens */
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = ioas.out_ioas_id,
		.user_va = (uintptr_t)buf,
		.length = MAP_LEN,
		.iova = MAP_IOVA,
	};
	int mapped = step_ioctl("smmu3-ioas-map", iommufd, IOMMU_IOAS_MAP, &map) == 0;

	struct iommu_hwpt_alloc parent = {
		.size = sizeof(parent),
		.flags = IOMMU_HWPT_ALLOC_NEST_PARENT,
		.dev_id = dev_id,
		.pt_id = ioas.out_ioas_id,
	};
	int have_parent = step_ioctl("smmu3-hwpt-alloc-nest-parent", iommufd, IOMMU_HWPT_ALLOC, &parent) == 0;

	struct iommu_viommu_alloc viommu = {
		.size = sizeof(viommu),
		.type = IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
		.dev_id = dev_id,
		.hwpt_id = parent.out_hwpt_id,
	};
	int have_viommu = 0;
	if (have_parent)
		have_viommu = step_ioctl("smmu3-viommu-alloc", iommufd, IOMMU_VIOMMU_ALLOC, &viommu) == 0;
	else
		skip("smmu3-viommu-alloc", "no nest-parent HWPT");

	struct iommu_vdevice_alloc vdev = {
		.size = sizeof(vdev),
		.viommu_id = viommu.out_viommu_id,
		.dev_id = dev_id,
		.virt_id = VSID,
	};
	int have_vdev = 0;
	if (have_viommu)
		have_vdev = step_ioctl("smmu3-vdevice-alloc", iommufd, IOMMU_VDEVICE_ALLOC, &vdev) == 0;
	else
		skip("smmu3-vdevice-alloc", "no vIOMMU");

	const uint64_t cdptr = (MAP_IOVA + CD_OFFSET) & STE0_S1CTXPTR_MASK;
	const struct {
		const char *name;
		uint64_t ste0;
		int invalidate;
	} rounds[] = {
		{ "abort", STE0_V | STE0_CFG(STE0_CFG_ABORT), 0 },
		{ "bypass", STE0_V | STE0_CFG(STE0_CFG_BYPASS), 0 },
		{ "s1", STE0_V | STE0_CFG(STE0_CFG_S1_TRANS) | STE0_S1FMT_LINEAR | cdptr | STE0_S1CDMAX(0), 1 },
	};
	for (size_t i = 0; i < sizeof(rounds) / sizeof(rounds[0]); i++) {
		if (have_viommu && have_vdev && mapped) {
			nested_round(iommufd, devfd, dev_id, viommu.out_viommu_id, rounds[i].name,
				     rounds[i].ste0, rounds[i].invalidate);
		} else {
			const char *why = !have_viommu ? "no vIOMMU" : !have_vdev ? "no vDEVICE" : "IOAS map failed";
			const char *suffix[] = { "hwpt-alloc-nested", "attach", "invalidate", "detach", "hwpt-destroy" };
			char step[96];

			for (size_t j = 0; j < 5; j++) {
				if (j == 2 && !rounds[i].invalidate)
					continue;
				snprintf(step, sizeof(step), "smmu3-%s-%s", rounds[i].name, suffix[j]);
				skip(step, why);
			}
		}
	}

	if (have_vdev)
		destroy(iommufd, vdev.out_vdevice_id, "smmu3-vdevice-destroy");
	else
		skip("smmu3-vdevice-destroy", "no vDEVICE");
	if (have_viommu)
		destroy(iommufd, viommu.out_viommu_id, "smmu3-viommu-destroy");
	else
		skip("smmu3-viommu-destroy", "no vIOMMU");
	if (have_parent)
		destroy(iommufd, parent.out_hwpt_id, "smmu3-hwpt-nest-parent-destroy");
	else
		skip("smmu3-hwpt-nest-parent-destroy", "no nest-parent HWPT");
	if (mapped) {
		struct iommu_ioas_unmap unmap = {
			.size = sizeof(unmap),
			.ioas_id = ioas.out_ioas_id,
			.iova = MAP_IOVA,
			.length = MAP_LEN,
		};
		step_ioctl("smmu3-ioas-unmap", iommufd, IOMMU_IOAS_UNMAP, &unmap);
	} else {
		skip("smmu3-ioas-unmap", "nothing mapped");
	}
	destroy(iommufd, ioas.out_ioas_id, "smmu3-ioas-destroy");
	close(devfd);
	close(iommufd);
	printf("smmu3: %d step(s) failed\n", failures);
	return failures ? 1 : 0;
}
