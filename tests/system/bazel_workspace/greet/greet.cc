#include "greet/greet.h"

namespace greet {

std::string Greeting(const std::string& who) { return "hello, " + who; }

}  // namespace greet
