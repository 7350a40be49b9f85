local function names_to(what, format)
  return { type = "map", default = {}, values = { type = "string", format = format }, description = what }
end

return { fields = {
  match = { type = "array", default = {}, description =
    "rules checked in order before any weight; the first rule whose conditions all hold sends the request to its upstream",
    elements = { type = "record", fields = {
      upstream = { type = "string", required = true, format = "upstream",
                   description = "name of a configured upstream" },
      headers = names_to("request header name: exact value it must have"),
      header_regex = names_to("request header name: regular expression (weir.re syntax) its value must match", "regex"),
      cookies = names_to("cookie name: exact value it must have"),
      cookie_regex = names_to("cookie name: regular expression its value must match", "regex"),
    } } },
  split = { type = "array", default = {}, description =
    "weighted shares of the requests no match rule took; the rest stays on the route's upstream",
    elements = { type = "record", fields = {
      upstream = { type = "string", required = true, format = "upstream",
                   description = "name of a configured upstream" },
      weight = { type = "number", required = true, min = 0, max = 100,
                 description = "percent of the requests (shares over 100 in total are scaled down to 100)" },
    } } },
} }
