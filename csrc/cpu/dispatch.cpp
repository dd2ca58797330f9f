// Chooses the kernels built for the best instruction set this CPU has.  ATen makes the
// same choice for its own kernels (and honours ATEN_CPU_CAPABILITY), so we follow it, and
// on top of its AVX512 take the bfloat16 instructions where the CPU has them.
#include "kernel_api.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace batchnorm_ext::cpu {
namespace {

struct Choice {
  const char* name;
  const KernelTable* table;
};

// Best first.
const Choice kChoices[] = {
#ifdef BATCHNORM_EXT_KERNEL_AVX512BF16
    {"AVX512_BF16", &kernels_AVX512_BF16},
#endif
#ifdef BATCHNORM_EXT_KERNEL_AVX512
    {"AVX512", &kernels_AVX512},
#endif
#ifdef BATCHNORM_EXT_KERNEL_AVX2
    {"AVX2", &kernels_AVX2},
#endif
#ifdef BATCHNORM_EXT_KERNEL_DEFAULT  // always, but in some sanitized builds (setup.py)
    {"DEFAULT", &kernels_DEFAULT},
#endif
};

// Best first, all of them: ATen's answer is found among these, built or not.
const char* const kAll[] = {"AVX512_BF16", "AVX512", "AVX2", "DEFAULT"};

const Choice* find(const std::string& name) {
  for (const Choice& choice : kChoices) {
    if (name == choice.name) return &choice;
  }
  return nullptr;
}

// The best set ATen's own check allows on this CPU, if built, else the next one built below
// it; none if a build without DEFAULT has nothing this CPU runs.
const Choice* best_choice() {
  std::string aten = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", ...
#ifdef BATCHNORM_EXT_X86
  // Not when ATEN_CPU_CAPABILITY chose: then it is ATen's choice exactly.
  if (aten == "AVX512" && std::getenv("ATEN_CPU_CAPABILITY") == nullptr &&
      __builtin_cpu_supports("avx512bf16")) {
    aten = "AVX512_BF16";
  }
#endif
  bool reached = false;
  for (const char* name : kAll) {
    reached = reached || aten == name;
    if (reached && find(name) != nullptr) return find(name);
  }
  return nullptr;
}

const Choice& runnable(const Choice* choice) {
  TORCH_CHECK(choice != nullptr, "batchnorm_ext was built without kernels this CPU can run "
              "(built: ", built_capabilities(), "; CPU: ", at::get_cpu_capability(), ")");
  return *choice;
}

std::atomic<const Choice*> active{nullptr};

const Choice& active_choice() {
  const Choice* choice = active.load(std::memory_order_acquire);
  if (choice == nullptr) {
    // Only if nothing was chosen meanwhile: a set_cpu_capability that ran since this
    // thread looked must not be overwritten (on failure `choice` receives its choice).
    const Choice* best = &runnable(best_choice());
    if (active.compare_exchange_strong(choice, best, std::memory_order_acq_rel)) choice = best;
  }
  return *choice;
}

}  // namespace

const KernelTable& active_kernels() { return *active_choice().table; }

std::string cpu_capability() { return active_choice().name; }

std::string built_capabilities() {
  std::string names;
  for (const Choice& choice : kChoices) names += (names.empty() ? "" : ",") + std::string(choice.name);
  return names;
}

void set_cpu_capability(const std::string& name) {
  const Choice* choice = find(name);
  TORCH_CHECK_VALUE(choice != nullptr, "batchnorm_ext: no kernels built for CPU capability '",
                    name, "'");
  // kChoices is ordered best first, so "at or below the best" is "at or after it".
  const Choice& best = runnable(best_choice());
  TORCH_CHECK_VALUE(choice >= &best, "batchnorm_ext: this CPU does not support ", name,
                    " (best: ", best.name, ")");
  active.store(choice, std::memory_order_release);
}

}  // namespace batchnorm_ext::cpu
