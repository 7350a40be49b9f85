return {
  fields = {
    header = { type = "string", default = "apikey",
               description = "request header carrying the key" },
    keys = { type = "map", values = { type = "string" }, required = true,
             description = "accepted keys, each mapped to its consumer name" },
  },
}
