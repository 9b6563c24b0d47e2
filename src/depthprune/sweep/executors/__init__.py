"""How a sweep's points run: one after the other in the sweep's process (:mod:`.serial`), or as Ray tasks on
a machine or a cluster (:mod:`.ray`). Both take the points still to do and save each row as it comes."""
