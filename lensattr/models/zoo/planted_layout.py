"""The planted model's vocabulary, sizes, residual-stream layout and planted constants (shared
by the wiring in :mod:`lensattr.zoo.planted` and the truth in :mod:`.planted_truth`)."""

from __future__ import annotations

import math

NAMES: tuple[str, ...] = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
FILLERS: tuple[str, ...] = ("went", "to", "the", "park", "and", "home")
BOS, DECOY_WORD, END_WORD = "<bos>", "then", "?"
VOCAB: tuple[str, ...] = (BOS, *NAMES, DECOY_WORD, END_WORD, *FILLERS)  # 17 tokens
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
NAME_IDS = tuple(TOKEN_ID[n] for n in NAMES)
ROLES = {"BOS": 0, "S1": 1, "DECOY": 3, "S2": 4, "END": 6}
SEQ_LEN, END = 7, ROLES["END"]
CONSTANT_HEAD = 6  # L0H6: its value is b_V alone
FILLER_POS = (2, 5)

# ---- sizes and residual layout -----------------------------------------------------------
D_MODEL, N_LAYERS, N_HEADS, D_HEAD, N_POS = 112, 2, 7, 16, 8
N_NAMES = len(NAMES)
BIG = 1000.0  # the +C / -C constant dims 0 and 1
BAL = 2  # balance dim: keeps every written vector zero-mean
E0 = 3  # token one-hot E(t), 17 dims
P0 = E0 + len(VOCAB)  # position one-hot P(i), 8 dims
U0 = P0 + N_POS  # answer direction U(k) per name: W_U reads it, nothing else does
T0 = U0 + N_NAMES  # tag T(k) per name: written by L0H3, read by L1H0's query
J0 = T0 + N_NAMES  # junk J(m): written by the inert layer-1 heads, read by nothing
K0 = J0 + 8  # constant tag K: written by L0H4 at every position, read by L1H4's query
G0 = K0 + 1  # gate G: written by L0H5 through its BOS term, read by L1H5's query
H0 = G0 + 1  # gate H: b_V @ W_O of the constant-value head L0H6, read by L1H5's query
assert H0 + 1 <= D_MODEL

# ---- planted constants -------------------------------------------------------------------
A_F, A_D, A_B = 4.0, 3.0, 5.0  # contributions of faithful, decoy, backup to logit diff
OFF = math.log(1e-9)  # attention score of an "off" source
SINK_GAIN = 5.0  # L0H2 writes names -> U but never attends a name at END
TAG = 1.0  # size of L0H3's tag T(k)
BETA, GAMMA = 14.0, 7.0  # L1H0 / L1H4 END-query score for S1 and BOS (before suppression)
LAMBDA = (BETA + 5.0) / (0.9 * TAG)  # tag suppression: S1 score 14 - 19 = -5 with B1 present
G2 = A_B  # L1H0's gain: when it takes over it restores B1's contribution
# Second backup pair, L0H4 (P) -> L1H4 (Q), triggered by a prompt-independent tag.
A_P = 4.0  # P's contribution to the logit diff (END attends S1 0.9)
KAPPA = 1.0  # size of P's constant tag K: every source's value carries it, attention sums to 1
LAMBDA_Q = (BETA + 5.0) / (0.9 * KAPPA)  # Q's S1 score 14 - 19 = -5 while >= 0.9 K is present
A_Q = 3.0  # Q's gain: when P is zeroed it restores 3 of P's 4
# Sink carrier L0H5 -> gated copier L1H5 <- constant-value head L0H6.
SINK_BOS = 0.7  # L0H5's END attention to BOS (the rest on S2, whose value is zero)
A_G = 3.0  # L1H5's gain: with G or H missing it copies S1, +3 on the metric
C_G, LAMBDA_G = 33.0, 19.0  # L1H5's END score for S1: 33 - 19 G - 19 H (both present: -5)
