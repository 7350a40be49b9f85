return {
  fields = {
    dict = { type = "string", default = "bench",
             description = "name of the weir.shared dictionary holding the counters" },
  },
}
