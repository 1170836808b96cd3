"""ComPEFT compression of updates: sparsify + ternarize (:mod:`.compeft`), Golomb-Rice
bitstream (:mod:`.rice`), whole-update wire payloads (:mod:`.codec`)."""
