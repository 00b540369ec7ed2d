"""The kernel ABI: parameter rows, enumerations, dtype codes and limits.

Generated from csrc/common/fastmerge_params.h by scripts/gen_abi.py -- do not edit;
tests/test_abi.py fails when it drifts from the header."""

# keep modes of iparams[:, I_MODE]
MODE_KEEP_ALL = 0
MODE_BAND = 1
MODE_KEEP_NONE = 2
MODE_DARE = 3

# selection score
SCORE_MAGNITUDE = 0  # |t|
SCORE_FISHER = 1  # (t * t) * v

# combine ids = index in fastmerge.methods.COMBINES
COMBINE_LINEAR = 0
COMBINE_SUM = 1
COMBINE_TIES = 2
COMBINE_CONSENSUS_SUM = 3
COMBINE_CONSENSUS_TIES = 4
COMBINE_OTA = 5
NUM_COMBINES = 6
ELECT_SUM = 0
ELECT_COUNT = 1
ELECT_WEIGHTED = 0
ELECT_UNWEIGHTED = 1
NORMALIZE_NONE = 0
NORMALIZE_WEIGHTS = 1
NORMALIZE_COUNT = 2

# fparams float32 [N, NUM_FPARAMS] columns
F_WEIGHT = 0
F_RESCALE = 1
F_LO = 2
F_HI = 3
F_CONSENSUS_LAMBDA = 4
F_OTA_SCALE = 5
NUM_FPARAMS = 6

# iparams int64 [N, NUM_IPARAMS] columns
I_MODE = 0
I_DARE_KEY = 1  # the 64-bit Philox key, stored as int64 bits
I_DARE_THRESHOLD = 2  # keep iff the DARE word < threshold (0 .. 2^32)
NUM_IPARAMS = 3

# radix selection: 16-bit digits of the 31-bit score pattern
RADIX_BITS = 16
NUM_BINS = 65536
NONFINITE_BIN = 0x7F80  # level-0 bins >= this hold Inf/NaN scores

# element dtype codes of the kernels' raw-pointer interface (not a torch enum)
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
DTYPE_BFLOAT16 = 2

# models one fused pass takes (FM_MAX_MODELS of csrc/common/fastmerge_config.h)
MAX_MODELS = 32
