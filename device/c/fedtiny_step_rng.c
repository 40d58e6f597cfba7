/* fedtiny's exact training step: the counter-based generator's public entry points (fedtiny_step.h). The
 * generator itself (ft_lowbias32, ft_uniform_at) is inline in fedtiny_step_internal.h: the update's and the
 * gradient quantization's loops draw a number per element. */
#include "fedtiny_step_internal.h"

uint32_t ft_hash32(uint32_t x) { return ft_lowbias32(x); }

uint32_t ft_stream_base(uint32_t seed, uint32_t step, uint32_t slot) {
    return ft_lowbias32(seed ^ ft_lowbias32(step ^ ft_lowbias32(slot)));
}
